#!/usr/bin/env bash
# Create .venv with everything megatron-patch needs on a CPU machine (idempotent: a second run is quick).
set -euo pipefail
cd "$(dirname "$0")/.."

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

[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch first and pinned, so nothing below can pull a CUDA build.
"${pip[@]}" -c constraints-cpu.txt torch
DS_BUILD_OPS=0 "${pip[@]}" -c constraints-cpu.txt -r requirements.txt -r requirements-dev.txt
"${pip[@]}" --no-deps -r requirements-dev-nodeps.txt
# Quiet setuptools chatter about editable wheels; on failure, rerun loudly. Extras: eval (HF interop, lm-eval),
# track (TensorBoard, W&B, matplotlib).
"${pip[@]}" -c constraints-cpu.txt -e ".[eval,track]" 2>/dev/null || "${pip[@]}" -c constraints-cpu.txt -e ".[eval,track]"
.venv/bin/python - <<'PY'
from importlib.metadata import version
print("setup: ready:", ", ".join(f"{p} {version(p)}" for p in ("torch", "megatron-core", "deepspeed", "sentencepiece", "mpi4py", "transformers", "lm_eval")))
PY
