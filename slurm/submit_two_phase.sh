#!/usr/bin/env bash
# Queue the whole two-phase plan with one command: [preprocess ->] phase 1 -> phase 2, each job starting only when
# the previous one succeeded (--dependency=afterok). Settings are environment variables (README.md, "Slurm");
# with INPUT set the data is preprocessed first into OUTPUT_PREFIX (DATA_PATH defaults to its text dataset).
# Arguments are sbatch options for every job:
#
#   INPUT='raw/*.jsonl' OUTPUT_PREFIX=data/corpus TOKENIZER_MODEL=tok.model CKPT_DIR=ckpt TRAIN_TOKENS=360000000000 \
#       bash slurm/submit_two_phase.sh -N 16 --gpus-per-node 8 --time 24:00:00
#
# Prints the plan, then one line per job: "<step>: job <id>".
set -euo pipefail
slurm_dir=$(dirname "${BASH_SOURCE[0]}")

# Every setting, and the plan, is checked before anything is queued.
if [ -n "${INPUT:-}" ]; then
  bash "$slurm_dir/preprocess.sbatch" --check
  export DATA_PATH=${DATA_PATH:-${OUTPUT_PREFIX}_text_document}
fi
bash "$slurm_dir/phase.sbatch" --check

after=()
if [ -n "${INPUT:-}" ]; then
  job=$(sbatch --parsable "$@" "$slurm_dir/preprocess.sbatch")
  echo "preprocess: job ${job%%;*}"
  after=(--dependency="afterok:${job%%;*}")
fi
for phase in 1 2; do
  job=$(sbatch --parsable --job-name="phase$phase" "${after[@]}" "$@" "$slurm_dir/phase.sbatch" "$phase")
  echo "phase $phase: job ${job%%;*}"
  after=(--dependency="afterok:${job%%;*}")
done
