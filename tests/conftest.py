"""Shared fixtures: a small real corpus (Python's own documentation) tokenized with a freshly trained
SentencePiece model, tiny model configs, and megatron-core initialised in this process (gloo, world size 1)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
sys.path.insert(0, ROOT)

from megatron_patch.parallel import free_port  # noqa: E402  (re-exported for the tests)

# LLaMA-style tiny model used by the end-to-end tests.
TINY_MODEL_FLAGS = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "176",
    "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope", "--disable-bias-linear",
    "--untie-embeddings-and-output-weights", "--hidden-dropout", "0", "--attention-dropout", "0",
]


def run(cmd, check=True, env=None, timeout=600):
    """Run a command from the repository root (os.environ updated with `env`, and a free MASTER_PORT unless
    `env` names one); on failure show its output in the assertion."""
    env = dict(os.environ, **{"MASTER_PORT": str(free_port()), **(env or {})})
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


# --standalone: torchrun picks a free rendezvous port itself (no race between tests choosing ports).
TORCHRUN = [PYTHON, "-m", "torch.distributed.run", "--standalone"]
_RUN_IDS = itertools.count()


def phase_flags(corpus, out, k, extra=(), steps=4, tied=False):
    """pretrain_patch_gpt flags for a short run of the tiny model: 8 samples of 32 patches per step (with `tied`,
    input and output embeddings shared)."""
    model = [f for f in TINY_MODEL_FLAGS if f != "--untie-embeddings-and-output-weights"] if tied else TINY_MODEL_FLAGS
    return [*model, "--patch-size", str(k), "--seq-length", str(32 * k), "--micro-batch-size", "2",
            "--global-batch-size", "8", "--train-iters", str(steps), "--lr", "3e-3", "--lr-warmup-iters", "1",
            "--data-path", corpus["aligned4"], "--tokenizer-model", corpus["tokenizer"],
            "--data-cache-path", str(out / "cache"), "--eval-interval", "1000", "--eval-iters", "1", *extra]


def launcher(nproc):
    return [*TORCHRUN, "--nproc-per-node", str(nproc)] if nproc > 1 else [PYTHON]


def train_losses(corpus, out, k, nproc, extra=(), steps=4):
    """(per-step losses, per-step grad norms, per-micro-batch losses of every step) of a short run of the tiny
    model on `nproc` processes (torchrun when > 1)."""
    return train_run(corpus, out, k, extra, steps, launcher(nproc))[0]


def train_run(corpus, out, k, extra=(), steps=4, launch=(PYTHON,), tied=False):
    """train_losses' series of a run started by the command prefix `launch`, and the run's stdout."""
    log = out / f"run{next(_RUN_IDS)}.jsonl"
    result = run([*launch, f"{ROOT}/pretrain_patch_gpt.py", *phase_flags(corpus, out, k, extra, steps, tied),
                  "--log-json", str(log)])
    with open(log) as f:
        records = [json.loads(line) for line in f if "loss" in json.loads(line)]
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


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A JSONL corpus of 160 real documents, a 1000-piece tokenizer trained on it, and its datasets:
    `aligned4` padded to patches of 4 tokens, `plain` as Megatron-LM would write it."""
    out = tmp_path_factory.mktemp("corpus")
    full = out / "full.jsonl"
    run([PYTHON, "examples/python_docs_corpus.py", "--output", str(full)])
    with open(full) as f:
        lines = f.readlines()[:160]
    jsonl = out / "docs.jsonl"
    jsonl.write_text("".join(lines))
    run([PYTHON, "tools/train_tokenizer.py", "--input", str(jsonl), "--model-prefix", str(out / "tok"),
         "--vocab-size", "1000"])
    common = [PYTHON, "tools/preprocess_data.py", "--input", str(jsonl), "--tokenizer-model", str(out / "tok.model"),
              "--append-eod"]
    run(common + ["--output-prefix", str(out / "aligned4"), "--patch-size", "4"])
    run(common + ["--output-prefix", str(out / "plain")])
    return {
        "dir": out,
        "jsonl": jsonl,
        "texts": [json.loads(line)["text"] for line in lines],
        "tokenizer": str(out / "tok.model"),
        "aligned4": str(out / "aligned4_text_document"),
        "plain": str(out / "plain_text_document"),
    }


@pytest.fixture(scope="session")
def start_checkpoint(corpus, tmp_path_factory):
    """A one-process checkpoint of a 4-layer tiny model after one step: common starting weights for layouts whose
    fresh initialisation differs from one process (pipeline stages seed their own layers)."""
    out = tmp_path_factory.mktemp("start")
    train_losses(corpus, out, 4, 1, ["--num-layers", "4", "--lr-warmup-iters", "0", "--save", str(out / "ckpt")],
                 steps=1)
    return str(out / "ckpt")


@pytest.fixture(scope="session")
def megatron_process():
    """megatron-core's parallel state for this test process: gloo, world size 1, TP=PP=1."""
    from megatron_patch import parallel
    from megatron_patch.config import ParallelConfig

    os.environ["MASTER_PORT"] = str(free_port())
    parallel.initialize(ParallelConfig(), seed=1234, launch=parallel.Launch(0, 1, 0))
    yield
    parallel.destroy()
