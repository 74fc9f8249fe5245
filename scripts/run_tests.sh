#!/usr/bin/env bash
# Set up (if needed) and run the tests on CPU. Extra arguments go to pytest.
#   bash scripts/run_tests.sh            the whole suite in .venv: Python 3.11, torch 2.13 (CPU), megatron-core 0.16
#   bash scripts/run_tests.sh --py312    the compatibility subset in .venv-py312: Python 3.12, torch 2.14.1, the
#                                        newest megatron-core (0.19); CI (.ci/run) runs both
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --py312 ]; then
  shift
  bash scripts/setup_cpu.sh --py312
  # What differs between megatron-core releases shows up here: the model and its hooks, the datasets, every
  # parallel layout's loss parity, the distributed optimizer, torch_dist save/resume/reshard/conversion, DeepSpeed
  # ZeRO 0-3 (all its tests), fp16 loss scaling, the two-phase plan, evaluation and HF export (all of tests/unit), and the phase hand-off.
  exec .venv-py312/bin/python -m pytest -q \
    tests/unit \
    tests/distributed/test_tensor_parallel.py \
    tests/distributed/test_pipeline_parallel.py \
    tests/distributed/test_data_parallel.py \
    tests/distributed/test_optimizer_sharding_and_torch_dist.py \
    tests/distributed/test_resume.py \
    tests/distributed/test_deepspeed.py \
    tests/distributed/test_fp16_parallel.py \
    "$@"
fi
bash scripts/setup_cpu.sh
exec .venv/bin/python -m pytest -q "$@"
