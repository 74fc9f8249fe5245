#!/usr/bin/env bash
# The whole pipeline on a CPU machine, in a few minutes: set up .venv, build a corpus of real English text (every
# 20th document held out), train a tokenizer, preprocess (patch-aligned), then
#   - the two-phase plan in the recipe the CPU study found best at this scale (RESULTS.md): a short, cheap phase 1
#     (K=8 on lambda=1/4 of the tokens), then phase 2 (token level, from phase 1's weights, on data phase 1 has not
#     seen, without a second warmup); the paper's recipe is one variable away: K=4 PATCH_FRACTION=0.6667;
#   - token-only baselines on the same tokens and on the same model FLOPs as the plan;
# evaluate every final model at token level on the held-out documents, and compare the runs in a table and a
# figure ($OUT/comparison.png, $OUT/comparison.md, $OUT/comparison.json), the plateau gauge (phase 1's unigram
# entropy) included.
# Knobs: OUT, K, PATCH_FRACTION, TOKENS, NPROC (data-parallel processes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu.sh

OUT=${OUT:-runs/quickstart}
K=${K:-8}
PATCH_FRACTION=${PATCH_FRACTION:-0.25}  # lambda: the plan's share of TOKENS read at patch level
TOKENS=${TOKENS:-1228800}     # training tokens of the plan and of the same-tokens baseline
NPROC=${NPROC:-1}
PY=.venv/bin/python
mkdir -p "$OUT"
rm -rf "$OUT/ckpt" "$OUT"/log*.jsonl "$OUT/baseline" "$OUT/same-flops" "$OUT"/eval_* "$OUT"/comparison.*
$PY examples/python_docs_corpus.py --output "$OUT/corpus.jsonl"
# Every 20th document is held out: neither the tokenizer nor either run sees it; both are scored on it.
awk 'NR % 20 != 0' "$OUT/corpus.jsonl" > "$OUT/train.jsonl"
awk 'NR % 20 == 0' "$OUT/corpus.jsonl" > "$OUT/heldout.jsonl"
$PY tools/train_tokenizer.py --input "$OUT/train.jsonl" --model-prefix "$OUT/tokenizer" --vocab-size 4000
$PY tools/preprocess_data.py --input "$OUT/train.jsonl" --output-prefix "$OUT/docs" \
    --tokenizer-model "$OUT/tokenizer.model" --append-eod --patch-size "$K" --workers 2

# The CPU study's model (RESULTS.md, "h96"): cpu-small, a 4-layer LLaMA-style model (RMSNorm, SwiGLU, RoPE, no
# biases, untied embeddings; presets.py) at hidden size 96, with the paper's AdamW settings (--recipe paper), a
# higher LR and short warmup for this tiny budget. Every run reads 32 samples x 256 tokens per step (phase 1: 32/K
# samples of K*256 tokens) in micro-batches of 32/K samples.
COMMON=(--model-preset cpu-small --hidden-size 96 --num-attention-heads 3 --ffn-hidden-size 258
        --recipe paper --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 10
        --data-path "$OUT/docs_text_document" --tokenizer-model "$OUT/tokenizer.model"
        --data-cache-path "$OUT/cache" --split "98,2,0" --log-interval 10 --eval-interval 25 --eval-iters 4
        --seq-length 256 --global-batch-size 32 --micro-batch-size $((32 / K / NPROC)))
launch=("$PY")
[ "$NPROC" -gt 1 ] && launch=(.venv/bin/torchrun --standalone --nproc-per-node "$NPROC")
# The plan's model FLOPs as a share of token-level training on the same tokens: lambda/K + 1 - lambda.
SAME_FLOPS_TOKENS=$($PY -c "print(round($TOKENS * ($PATCH_FRACTION / $K + 1 - $PATCH_FRACTION)))")

# The two-phase plan in one command: lambda of the budget goes to phase 1 (K*256 tokens = 256 patches per sample)
# on the first lambda of the data, then phase 2 continues from its weights on the rest, at its peak LR at once.
# `tools/plan.py` with the same flags prints the plan without running it.
echo "== two-phase plan: K=$K, lambda=$PATCH_FRACTION, $TOKENS tokens"
"${launch[@]}" pretrain_patch_gpt.py "${COMMON[@]}" --train-tokens "$TOKENS" --patch-size "$K" \
    --patch-fraction "$PATCH_FRACTION" --phase2-lr-warmup-iters 0 --save "$OUT/ckpt" --log-json "$OUT/log.jsonl"

echo "== token-only baseline: K=1, $TOKENS tokens (the plan's tokens)"
"${launch[@]}" pretrain_patch_gpt.py "${COMMON[@]}" --train-tokens "$TOKENS" --patch-size 1 \
    --save "$OUT/baseline/ckpt" --log-json "$OUT/baseline/log.jsonl"

echo "== token-only baseline: K=1, $SAME_FLOPS_TOKENS tokens (the plan's model FLOPs)"
"${launch[@]}" pretrain_patch_gpt.py "${COMMON[@]}" --train-tokens "$SAME_FLOPS_TOKENS" --patch-size 1 \
    --save "$OUT/same-flops/ckpt" --log-json "$OUT/same-flops/log.jsonl"

echo "== held-out documents, token level"
for run in baseline same-flops two-phase; do
  ckpt=$OUT/$run/ckpt
  [ "$run" = two-phase ] && ckpt=$OUT/ckpt/phase2
  $PY tools/evaluate.py --load "$ckpt" --text "$OUT/heldout.jsonl" --seq-length 256 --micro-batch-size 8 \
      --output "$OUT/eval_$run.json" > "$OUT/eval_$run.log"
  echo "$run: $(grep -v '^{' "$OUT/eval_$run.log")"    # its score line (the JSON is in eval_$run.json)
done

echo "== summary of the two phases"
$PY examples/two_phase_summary.py "$OUT/log.phase1.jsonl" "$OUT/log.phase2.jsonl"

echo "== comparison (figure: $OUT/comparison.png)"
$PY tools/plot_runs.py baseline="$OUT/baseline" same-flops="$OUT/same-flops" two-phase="$OUT" \
    --eval baseline="$OUT/eval_baseline.json" --eval same-flops="$OUT/eval_same-flops.json" \
    --eval two-phase="$OUT/eval_two-phase.json" \
    --output "$OUT/comparison.png" --table "$OUT/comparison.md" --json "$OUT/comparison.json" \
    --title "quick start: two-phase (K=$K, lambda=$PATCH_FRACTION) vs token-only on its tokens and on its FLOPs"
