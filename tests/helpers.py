"""What the tests share besides fixtures (conftest.py): running the trainer and tools as users do, the short runs of
the tiny model, the parallel layouts every parity test compares, and comparing runs."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys

import pytest

from megatron_patch.distributed.parallel import free_port
from megatron_patch.training import json_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
# --standalone: torchrun picks a free rendezvous port itself (no race between tests choosing ports). The tests of
# launching use it; the others start their ranks with tests/ranks.py (torchrun's environment, no torch import).
TORCHRUN = [PYTHON, "-m", "torch.distributed.run", "--standalone"]
TINY = ["--model-preset", "tiny"]  # the LLaMA-style model of every end-to-end test (presets.py)
TIED = ["--no-untie-embeddings-and-output-weights"]
# The default checkpoint format. The short runs save Megatron-LM's legacy per-rank files unless a test asks for
# torch_dist: on CPU its writer costs each process ~5 s (a helper process imports torch to collect the results).
TORCH_DIST = ["--ckpt-format", "torch_dist"]

TP2 = ["--tensor-model-parallel-size", "2"]
PP2 = ["--pipeline-model-parallel-size", "2"]
VPP2 = [*PP2, "--num-layers-per-virtual-pipeline-stage", "1"]  # with 4 layers: 2 chunks of 1 layer per stage
# name -> (processes, flags): the layouts the parity tests compare with one process.
LAYOUTS = {
    "dp2": (2, []),
    "tp2": (2, TP2),
    "tp2_sp": (2, [*TP2, "--sequence-parallel"]),
    "pp2": (2, PP2),
    "pp2_vpp2": (2, VPP2),
    "tp2_pp2": (4, [*TP2, *PP2]),
    "dp2_pp2_vpp2": (4, VPP2),
}

_RUN_IDS = itertools.count()


def run(cmd, check=True, env=None, timeout=600):
    """Run a command from the repository root (os.environ updated with `env`, and a free MASTER_PORT unless
    `env` names one); on failure show its output in the assertion."""
    env = dict(os.environ, **{"MASTER_PORT": str(free_port()), **(env or {})})
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def launcher(nproc):
    return [PYTHON, os.path.join(ROOT, "tests", "ranks.py"), str(nproc)] if nproc > 1 else [PYTHON]


def phase_flags(corpus, out, k, extra=(), steps=4, tied=False):
    """pretrain_patch_gpt flags for a short run of the tiny model: 8 samples of 32 patches per step (with `tied`,
    input and output embeddings shared), checkpoints in the legacy format (TORCH_DIST). Later occurrences of a flag
    in `extra` win. The paper's optimizer (--recipe paper, its LR and warmup overridden), a log line every 10 steps
    and the data read in-process, as the trainer's defaults were before they became Megatron-LM's."""
    return [*TINY, *(TIED if tied else []), "--recipe", "paper", "--log-interval", "10", "--num-workers", "0",
            "--patch-size", str(k), "--seq-length", str(32 * k),
            "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(steps), "--lr", "3e-3",
            "--lr-warmup-iters", "1", "--data-path", corpus["aligned4"], "--tokenizer-model", corpus["tokenizer"],
            "--data-cache-path", str(out / "cache"), "--eval-interval", "1000", "--eval-iters", "1",
            "--ckpt-format", "torch", *extra]


def plan_flags(corpus, out, fraction, extra=()):
    """8 steps of 1024 tokens (phase 2: 32 samples of 32 tokens): a two-phase plan at K=4 with `fraction`, or
    token-only at fraction 0; validated every 4 steps, saved under out/ckpt, logged to out/log.jsonl."""
    budget = ["--seq-length", "32", "--global-batch-size", "32", "--micro-batch-size", "8", "--train-iters", "8"]
    plan = ["--patch-fraction", str(fraction)] if fraction else ["--patch-size", "1"]
    return [*phase_flags(corpus, out, 4, ["--split", "90,10,0", "--eval-interval", "4"]), *budget, *plan,
            "--save", str(out / "ckpt"), "--log-json", str(out / "log.jsonl"), *extra]


def train_losses(corpus, out, k, nproc, extra=(), steps=4):
    """(per-step losses, per-step grad norms, per-micro-batch losses of every step) of a short run of the tiny
    model on `nproc` processes (torchrun when > 1)."""
    return train_run(corpus, out, k, extra, steps, launcher(nproc))[0]


def train_run(corpus, out, k, extra=(), steps=4, launch=(PYTHON,), tied=False):
    """train_losses' series of a run started by the command prefix `launch`, and the run's stdout."""
    log = out / f"run{next(_RUN_IDS)}.jsonl"
    result = run([*launch, f"{ROOT}/pretrain_patch_gpt.py", *phase_flags(corpus, out, k, extra, steps, tied),
                  "--log-json", str(log)])
    records = list(json_log.steps(str(log)).values())
    series = ([r["loss"] for r in records], [r["grad_norm"] for r in records],
              [loss for r in records for loss in r["microbatch_losses"]])
    return series, result.stdout


def assert_same_run(reference, other, tolerance=1e-5):
    """Same step losses, grad norms and per-micro-batch losses (global sample order) within `tolerance`."""
    for ref_values, values in zip(reference, other):
        assert len(values) == len(ref_values) > 1
        for a, b in zip(ref_values, values):
            assert abs(a - b) <= tolerance * max(1.0, abs(a)), (reference, other)
    ref_loss = reference[0]
    assert ref_loss[-1] < ref_loss[0]  # the steps really trained


def ensure_programs(programs, packages):
    """Make `programs` available, apt-get installing `packages` if one is missing; skip (saying why) when that
    cannot be done here."""
    missing = [p for p in programs if not shutil.which(p)]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{', '.join(missing)} missing, and installing {' '.join(packages)} needs root and apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    # Try the package lists at hand first; refresh them only if that fails (a fresh image has none).
    if subprocess.run(install, capture_output=True, env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env)
        result = subprocess.run(install, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            pytest.skip(f"apt-get could not install {' '.join(packages)}: {result.stderr.strip()[-300:]}")
