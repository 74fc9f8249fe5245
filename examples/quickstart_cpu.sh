#!/usr/bin/env bash
# The whole pipeline on a CPU machine, in a few minutes: set up .venv, build a corpus of real English text,
# train a tokenizer, preprocess (patch-aligned), then phase 1 (patch level, K=4) and phase 2 (token level,
# from phase 1's weights, on data phase 1 has not seen), and compare their cost.
# Knobs: OUT, K, TOKENS, NPROC (data-parallel processes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu.sh

OUT=${OUT:-runs/quickstart}
K=${K:-4}
TOKENS=${TOKENS:-1536000}      # total training tokens; lambda=2/3 of them go to phase 1
NPROC=${NPROC:-1}
PY=.venv/bin/python
mkdir -p "$OUT"
rm -rf "$OUT/ckpt" "$OUT"/log*.jsonl
$PY examples/python_docs_corpus.py --output "$OUT/corpus.jsonl"
$PY tools/train_tokenizer.py --input "$OUT/corpus.jsonl" --model-prefix "$OUT/tokenizer" --vocab-size 4000
$PY tools/preprocess_data.py --input "$OUT/corpus.jsonl" --output-prefix "$OUT/docs" \
    --tokenizer-model "$OUT/tokenizer.model" --append-eod --patch-size "$K" --workers 2

# cpu-small: a 4-layer LLaMA-style model (RMSNorm, SwiGLU, RoPE, no biases, untied embeddings; presets.py) with
# the paper's AdamW settings (the defaults), a higher LR and short warmup for this tiny budget.
COMMON=(--model-preset cpu-small --lr 1e-3 --min-lr 1e-4
        --data-path "$OUT/docs_text_document" --tokenizer-model "$OUT/tokenizer.model"
        --data-cache-path "$OUT/cache" --split "98,2,0" --log-interval 10 --eval-interval 1000 --eval-iters 4)
launch=("$PY")
[ "$NPROC" -gt 1 ] && launch=(.venv/bin/torchrun --standalone --nproc-per-node "$NPROC")

# The two-phase plan in one command: the token-level run is 32 samples x 256 tokens per step; lambda=2/3 of
# the budget goes to phase 1 (K*256 tokens = 256 patches per sample, 32/K samples: the same tokens per step) on
# the first 2/3 of the data, then phase 2 continues from its weights on the rest. `tools/plan.py` with the same
# flags prints the plan without running it.
echo "== two-phase plan: K=$K, lambda=2/3, $TOKENS tokens"
"${launch[@]}" pretrain_patch_gpt.py "${COMMON[@]}" --patch-size "$K" --patch-fraction 0.6667 \
    --seq-length 256 --global-batch-size 32 --micro-batch-size $((32 / K / NPROC)) --train-tokens "$TOKENS" \
    --lr-warmup-iters 10 --save "$OUT/ckpt" --log-json "$OUT/log.jsonl"

echo "== summary"
$PY examples/two_phase_summary.py "$OUT/log.phase1.jsonl" "$OUT/log.phase2.jsonl"
