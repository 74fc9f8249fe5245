# Shared by the Slurm scripts: `source slurm/common.sh NAME` (NAME: the script, for messages). Settings checks and
# the repository's location.
# shellcheck shell=bash

MEGATRON_PATCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export MEGATRON_PATCH_DIR
script_name=$1

fail() {
  echo "$script_name: error: $*" >&2
  exit 2
}

# require_settings NAME... : each NAME (or one of A|B) must be set in the environment; one line lists what is not.
require_settings() {
  local missing=() wanted name found
  for wanted in "$@"; do
    found=
    for name in ${wanted//|/ }; do
      [ -n "${!name:-}" ] && found=1
    done
    [ -n "$found" ] || missing+=("${wanted//|/ or }")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    local list
    list=$(printf ', %s' "${missing[@]}")
    fail "missing settings: ${list#, } (environment variables; see the Slurm section of README.md)"
  fi
}

# The tokenizer flags (Megatron-LM's, megatron_patch/config/tokenizer.py) from the settings that are set:
# TOKENIZER_TYPE, TOKENIZER_MODEL (SentencePiece .model, HF tokenizer.json or directory), VOCAB_FILE + MERGE_FILE
# (GPT2BPETokenizer), VOCAB_SIZE (NullTokenizer). A tokenizer is required: TOKENIZER_SETTING is the
# require_settings entry for it.
# shellcheck disable=SC2034  # used by the scripts that source this file
TOKENIZER_SETTING="TOKENIZER_MODEL|VOCAB_FILE|VOCAB_SIZE"
tokenizer_flags=()
[ -z "${TOKENIZER_TYPE:-}" ] || tokenizer_flags+=(--tokenizer-type "$TOKENIZER_TYPE")
[ -z "${TOKENIZER_MODEL:-}" ] || tokenizer_flags+=(--tokenizer-model "$TOKENIZER_MODEL")
[ -z "${VOCAB_FILE:-}" ] || tokenizer_flags+=(--vocab-file "$VOCAB_FILE")
[ -z "${MERGE_FILE:-}" ] || tokenizer_flags+=(--merge-file "$MERGE_FILE")
[ -z "${VOCAB_SIZE:-}" ] || tokenizer_flags+=(--vocab-size "$VOCAB_SIZE")

# The scripts run one job step; run through sbatch (or inside salloc), never on a login node by mistake.
require_job() {
  [ -n "${SLURM_JOB_ID:-}" ] || fail "not inside a Slurm job: submit with sbatch (settings check only: --check)"
}
