#!/usr/bin/env bash
# Export a checkpoint to a HuggingFace model directory and run lm-evaluation-harness on it (its `hf` backend).
#
#   bash tools/lm_eval.sh CKPT OUT --tasks hellaswag,piqa,winogrande,arc_easy,arc_challenge,mmlu [lm_eval args...]
#   bash tools/lm_eval.sh ckpt/phase2 runs/eval --include_path tasks/ --tasks python_docs_cloze   # offline task
#
# OUT/hf holds the exported model (replaced if present), OUT/results lm-eval's JSON. Settings (environment):
# PYTHON (python3), DTYPE (lm-eval's dtype: bfloat16 on GPUs; float32 on CPU), DEVICE (cuda:0 if torch sees a GPU,
# else cpu), BATCH_SIZE (auto on GPUs, 8 on CPU).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: lm_eval.sh CKPT OUT [lm_eval arguments, e.g. --tasks hellaswag]" >&2
  exit 2
fi
ckpt=$1 out=$2
shift 2
: "${PYTHON:=python3}"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  : "${DEVICE:=cuda:0}" "${DTYPE:=bfloat16}" "${BATCH_SIZE:=auto}"
else
  : "${DEVICE:=cpu}" "${DTYPE:=float32}" "${BATCH_SIZE:=8}"
fi
mkdir -p "$out"
"$PYTHON" "$here/export_hf.py" "$ckpt" "$out/hf" --overwrite
"$PYTHON" -m lm_eval run --model hf --model_args "pretrained=$out/hf,dtype=$DTYPE" --device "$DEVICE" \
  --batch_size "$BATCH_SIZE" --output_path "$out/results" "$@"
