"""benchmarks/gpu_check.sh cannot rot: its --cpu-smoke runs every step of the GPU check at tiny sizes on the CPU
and writes the same table; a difference over its bound fails the check; --help needs no torch (a bare machine)."""

import json
import sys

import pytest
import torch

from helpers import PYTHON, run

STEPS = {"correctness", "speed", "plan", "parallel"}


def gpu_check(out, *flags, check=True):
    return run(["bash", "benchmarks/gpu_check.sh", "--cpu-smoke", "--python", PYTHON, "--out", str(out), *flags],
               check=check, timeout=900)


def test_the_cpu_smoke_run_passes_every_step_and_writes_the_table(tmp_path):
    result = gpu_check(tmp_path)
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    table = (tmp_path / "gpu_check.md").read_text()
    assert record["passed"] and "all checks passed" in result.stdout
    assert {row["step"] for row in record["rows"]} == STEPS
    checks = [row for row in record["rows"] if row["result"] not in ("measured", "skipped")]
    assert len(checks) == 7 and all(row["result"] == "pass" for row in checks), checks  # 4 + 1 + 2
    for row in record["rows"]:
        assert f"| {row['step']} | {row['check']} | {row['measured']} |" in table
    for k in (1, 4):
        speed = record["speed"][f"local_K{k}"]
        assert speed["tokens_per_sec"] > 0 and 0 < speed["mfu"] < 1 and speed["peak_memory_gb"] > 0
    assert record["speed"]["local_K1"]["flops_per_token"] > 3 * record["speed"]["local_K4"]["flops_per_token"]
    assert "K=4 speed-up over K=1, local layers" in table and "FLOP ratio 4.00x" in table
    assert record["about"]["setup"].endswith(" s")
    assert "| Transformer Engine layers | --cpu-smoke (GPU only) |  | skipped |" in table


def test_a_difference_over_its_bound_fails_the_check(tmp_path):
    result = gpu_check(tmp_path, "--only", "correctness", "--max-bf16-gap", "0", check=False)
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result.returncode == 1 and not record["passed"] and "a check FAILED" in result.stdout
    assert [(row["check"].split(":")[0], row["result"]) for row in record["rows"]] == [
        ("K=4 fp32", "pass"), ("K=4", "FAIL"), ("K=1 fp32", "pass"), ("K=1", "FAIL")]


def test_help_says_what_it_measures_without_torch():
    # torch blocked: --help must work on a bare machine, before the setup installs it.
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['gpu_check.py', '--help']; "
            "runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')")
    result = run([sys.executable, "-c", code], check=False)
    assert result.returncode == 0, result.stderr
    for step in (*STEPS, "data", "Budget on one H100", "under 8 minutes"):
        assert step in result.stdout
    shell = run(["bash", "benchmarks/gpu_check.sh", "--help", "--python", PYTHON])
    assert "TE_INSTALL_SECONDS" in shell.stdout and "usage: gpu_check.py" in shell.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the check would run")
def test_without_a_gpu_it_says_to_use_the_cpu_smoke_run(tmp_path):
    result = run([PYTHON, "benchmarks/gpu_check.py", "--out", str(tmp_path)], check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "gpu_check.py: error: no CUDA device; --cpu-smoke runs the same steps on the CPU"
