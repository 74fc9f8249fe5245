#!/usr/bin/env bash
# The whole pipeline on a CPU machine, in a few minutes: set up .venv, build a corpus of real English text (every
# 20th document held out), train a tokenizer, preprocess (patch-aligned), then
#   - the two-phase plan: phase 1 (patch level, K=4) and phase 2 (token level, from phase 1's weights, on data
#     phase 1 has not seen), and compare their cost;
#   - the token-only baseline on the same number of tokens;
# evaluate both final models at token level on the held-out documents, and compare the runs in a table and a
# figure ($OUT/comparison.png, $OUT/comparison.md, $OUT/comparison.json).
# Knobs: OUT, K, TOKENS, NPROC (data-parallel processes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu.sh

OUT=${OUT:-runs/quickstart}
K=${K:-4}
TOKENS=${TOKENS:-1536000}      # training tokens of each run; lambda=2/3 of the plan's go to phase 1
NPROC=${NPROC:-1}
PY=.venv/bin/python
mkdir -p "$OUT"
rm -rf "$OUT/ckpt" "$OUT"/log*.jsonl "$OUT/baseline" "$OUT"/eval_* "$OUT"/comparison.*
$PY examples/python_docs_corpus.py --output "$OUT/corpus.jsonl"
# Every 20th document is held out: neither the tokenizer nor either run sees it; both are scored on it.
awk 'NR % 20 != 0' "$OUT/corpus.jsonl" > "$OUT/train.jsonl"
awk 'NR % 20 == 0' "$OUT/corpus.jsonl" > "$OUT/heldout.jsonl"
$PY tools/train_tokenizer.py --input "$OUT/train.jsonl" --model-prefix "$OUT/tokenizer" --vocab-size 4000
$PY tools/preprocess_data.py --input "$OUT/train.jsonl" --output-prefix "$OUT/docs" \
    --tokenizer-model "$OUT/tokenizer.model" --append-eod --patch-size "$K" --workers 2

# cpu-small: a 4-layer LLaMA-style model (RMSNorm, SwiGLU, RoPE, no biases, untied embeddings; presets.py) with
# the paper's AdamW settings (--recipe paper), a higher LR and short warmup for this tiny budget. Both runs read
# 32 samples x 256 tokens per step (phase 1: 32/K samples of K*256 tokens) in micro-batches of 32/K samples.
COMMON=(--model-preset cpu-small --recipe paper --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 10
        --data-path "$OUT/docs_text_document" --tokenizer-model "$OUT/tokenizer.model"
        --data-cache-path "$OUT/cache" --split "98,2,0" --log-interval 10 --eval-interval 25 --eval-iters 4
        --seq-length 256 --global-batch-size 32 --micro-batch-size $((32 / K / NPROC)) --train-tokens "$TOKENS")
launch=("$PY")
[ "$NPROC" -gt 1 ] && launch=(.venv/bin/torchrun --standalone --nproc-per-node "$NPROC")

# The two-phase plan in one command: lambda=2/3 of the budget goes to phase 1 (K*256 tokens = 256 patches per
# sample) on the first 2/3 of the data, then phase 2 continues from its weights on the rest. `tools/plan.py`
# with the same flags prints the plan without running it.
echo "== two-phase plan: K=$K, lambda=2/3, $TOKENS tokens"
"${launch[@]}" pretrain_patch_gpt.py "${COMMON[@]}" --patch-size "$K" --patch-fraction 0.6667 \
    --save "$OUT/ckpt" --log-json "$OUT/log.jsonl"

echo "== token-only baseline: K=1, $TOKENS tokens"
"${launch[@]}" pretrain_patch_gpt.py "${COMMON[@]}" --patch-size 1 \
    --save "$OUT/baseline/ckpt" --log-json "$OUT/baseline/log.jsonl"

echo "== held-out documents, token level"
for run in baseline two-phase; do
  ckpt=$OUT/baseline/ckpt
  [ "$run" = two-phase ] && ckpt=$OUT/ckpt/phase2
  $PY tools/evaluate.py --load "$ckpt" --text "$OUT/heldout.jsonl" --seq-length 256 --micro-batch-size 8 \
      --output "$OUT/eval_$run.json" > "$OUT/eval_$run.log"
  echo "$run: $(grep -v '^{' "$OUT/eval_$run.log")"    # its score line (the JSON is in eval_$run.json)
done

echo "== summary of the two phases"
$PY examples/two_phase_summary.py "$OUT/log.phase1.jsonl" "$OUT/log.phase2.jsonl"

echo "== comparison (figure: $OUT/comparison.png)"
$PY tools/plot_runs.py baseline="$OUT/baseline" two-phase="$OUT" \
    --eval baseline="$OUT/eval_baseline.json" --eval two-phase="$OUT/eval_two-phase.json" \
    --output "$OUT/comparison.png" --table "$OUT/comparison.md" --json "$OUT/comparison.json" \
    --title "quick start: two-phase (K=$K, lambda=2/3) vs token-only, $TOKENS tokens each"
