#!/usr/bin/env bash
# Create a venv with everything megatron-patch needs on a CPU machine (idempotent: a second run is quick).
#   bash scripts/setup_cpu.sh           .venv:       Python 3.11, torch 2.13.0 (CPU build), megatron-core 0.16.x
#   bash scripts/setup_cpu.sh --py312   .venv-py312: Python 3.12, torch 2.14.1 (the registry's CUDA build, ~5.5 GB;
#                                       it runs on the CPU), the newest supported megatron-core (0.19.x)
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv python=python3 constraints=constraints-cpu.txt
case "${1:-}" in
  "") ;;
  --py312)
    venv=.venv-py312 constraints=constraints-py312.txt
    python=""  # a pyenv shim may exist without answering, so each candidate is asked for its version
    for candidate in "$(pyenv root 2>/dev/null || echo ~/.pyenv)"/versions/3.12*/bin/python3.12 "$(command -v python3.12 || true)"; do
      if [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
        python=$candidate
        break
      fi
    done
    if [ -z "$python" ]; then
      echo "setup: error: --py312: no python3.12 on PATH or under pyenv (pyenv install 3.12)" >&2
      exit 1
    fi ;;
  *) echo "setup: error: unknown option $1 (use --py312 or nothing)" >&2; exit 2 ;;
esac

# mpi4py compiles against an MPI; Debian's Open MPI installs in seconds when we are root.
if ! command -v mpicc >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Open MPI (apt-get)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libopenmpi-dev openmpi-bin >/dev/null
  else
    echo "setup: error: mpicc not found; install an MPI (e.g. apt-get install libopenmpi-dev openmpi-bin)" >&2
    exit 1
  fi
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
# torch first and pinned, so nothing below can pull another build.
"${pip[@]}" -c "$constraints" torch
DS_BUILD_OPS=0 "${pip[@]}" -c "$constraints" -r requirements.txt -r requirements-dev.txt
"${pip[@]}" --no-deps -r requirements-dev-nodeps.txt
# Quiet setuptools chatter about editable wheels; on failure, rerun loudly. Extras: eval (HF interop, lm-eval),
# track (TensorBoard, W&B, matplotlib).
"${pip[@]}" -c "$constraints" -e ".[eval,track]" 2>/dev/null || "${pip[@]}" -c "$constraints" -e ".[eval,track]"
"$venv/bin/python" - <<'PY'
import sys
from importlib.metadata import version
print(f"setup: ready: Python {sys.version.split()[0]},",
      ", ".join(f"{p} {version(p)}" for p in ("torch", "megatron-core", "deepspeed", "sentencepiece", "mpi4py", "transformers", "lm_eval")))
PY
