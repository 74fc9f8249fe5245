#!/usr/bin/env bash
# The GPU check from a bare CUDA machine: sets up a venv from the package registries (each step timed), then runs
# benchmarks/gpu_check.py, which measures correctness, speed, memory, a resumed plan and parallel parity and writes
# one table (OUT/gpu_check.md, OUT/gpu_check.json); exit 1 if a check fails.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [gpu_check.py options]      set up .venv-gpu, then check the GPU(s)
#   bash benchmarks/gpu_check.sh --cpu-smoke --python .venv/bin/python   the same steps at tiny sizes on the CPU
#                                                                         (with --python: no setup)
# Setup (estimates for one H100 machine; no GPU run has been measured yet): the venv, seconds; torch, the
# registry's CUDA build (5.5 GB in the venv; for Python 3.11 pip takes it from the machine's disk), 1-2 min;
# megatron-core and the trainer's few runtime dependencies, ~20 s; the project itself (editable), seconds.
# Transformer Engine is optional: its PyTorch extension is a source package that compiles against the installed
# torch, which takes longer than the check's budget, so it gets TE_INSTALL_SECONDS (default 90; 0 skips it;
# TE_INSTALL_SECONDS=900 gives it time to compile, outside the 8-minute budget) and
# the check goes on without its rows if it is not ready by then (pip's output: VENV/te_install.log; every other step's: VENV.setup.log). No apex.
# Knobs: GPU_CHECK_VENV (default .venv-gpu), TORCH_SPEC (default torch==2.14.1), TE_INSTALL_SECONDS.
set -euo pipefail
cd "$(dirname "$0")/.."

python="" args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --python) python=$2; shift 2 ;;
    -h|--help)
      sed -n '2,/^set -euo/p' "$0" | sed -n 's/^# \{0,1\}//p'
      echo
      exec "${python:-python3}" benchmarks/gpu_check.py --help ;;
    *) args+=("$1"); shift ;;
  esac
done

SECONDS=0
timed() {  # timed NAME COMMAND...: run a setup step (its output in VENV/setup.log), print its time
  local name=$1 started=$SECONDS
  shift
  echo "setup: $name ..."
  if ! "$@" >>"$setup_log" 2>&1; then
    tail -n 20 "$setup_log" >&2
    echo "setup: error: $name failed (its output: $setup_log)" >&2
    exit 1
  fi
  echo "setup: $name: $((SECONDS - started)) s"
}

install_transformer_engine() {  # VENV SECONDS: optional; the check goes on without it
  local venv=$1 budget=$2 started=$SECONDS cuda site
  cuda=$("$venv/bin/python" -c 'import torch; print((torch.version.cuda or "12").split(".")[0])' 2>/dev/null)
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "setup: Transformer Engine for CUDA $cuda (optional, at most $budget s) ..."
  # The extension builds against this venv's torch (--no-build-isolation) and the CUDA, cuDNN and NCCL headers
  # that torch's CUDA wheels carry under site-packages/nvidia/*/include.
  local includes
  includes=$(printf '%s:' "$site"/nvidia/*/include)
  if CPATH="${includes}${CPATH:-}" CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} NVTE_FRAMEWORK=pytorch \
     timeout "$budget" bash -c '"$@" pybind11 ninja setuptools wheel &&
                                "$@" --no-build-isolation "transformer_engine[pytorch,core_cu'"$cuda"']"' _ "${pip[@]}" \
       >"$venv/te_install.log" 2>&1; then
    echo "setup: Transformer Engine: $((SECONDS - started)) s"
  else
    echo "setup: Transformer Engine: not installed after $((SECONDS - started)) s (pip's output: $venv/te_install.log);" \
         "the check goes on with the local layers only"
  fi
}

if [ -z "$python" ]; then
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  venv=${GPU_CHECK_VENV:-.venv-gpu}
  setup_log=$venv.setup.log
  : >"$setup_log"
  [ -x "$venv/bin/python" ] || timed "venv $venv ($(python3 --version))" python3 -m venv "$venv"
  pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
  timed "${TORCH_SPEC:-torch==2.14.1} (the CUDA build)" "${pip[@]}" "${TORCH_SPEC:-torch==2.14.1}"
  torch_version=$("$venv/bin/python" -c 'from importlib.metadata import version; print(version("torch").split("+")[0])')
  # Only what training imports (DeepSpeed, mpi4py and the HF extras are not needed here); torch stays as installed.
  timed "megatron-core and the trainer's dependencies" "${pip[@]}" -c <(echo "torch==$torch_version") \
      "megatron-core>=0.16,<0.20" sentencepiece numpy tqdm psutil zstandard
  timed "megatron-patch (editable)" "${pip[@]}" --no-deps -e .
  te_seconds=${TE_INSTALL_SECONDS:-90}
  if [ "$te_seconds" -gt 0 ] && ! "$venv/bin/python" -c 'import transformer_engine.pytorch' 2>/dev/null; then
    install_transformer_engine "$venv" "$te_seconds"
  fi
  python=$venv/bin/python
fi
echo "setup: ${SECONDS} s in all"
exec "$python" benchmarks/gpu_check.py --setup-seconds "$SECONDS" ${args[@]+"${args[@]}"}
