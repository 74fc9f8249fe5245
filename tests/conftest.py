"""Fixtures: a small real corpus (Python's own documentation) tokenized with a freshly trained SentencePiece model,
a common starting checkpoint, and megatron-core initialised in this process (gloo, world size 1). Helpers that
tests import live in helpers.py."""

from __future__ import annotations

import json
import os

import pytest

from helpers import PYTHON, free_port, phase_flags, run, train_losses
from megatron_patch.config.schema import ParallelConfig
from megatron_patch.distributed import parallel


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
def saved(corpus, tmp_path_factory):
    """(flags, checkpoint directory) of a 2-step run of the tiny model, for tests that only read it."""
    out = tmp_path_factory.mktemp("saved")
    flags = phase_flags(corpus, out, 4, ["--save", str(out / "ckpt")], steps=2)
    run([PYTHON, "pretrain_patch_gpt.py", *flags])
    return flags, str(out / "ckpt")


@pytest.fixture(scope="session")
def one_process(corpus, tmp_path_factory):
    """The parity tests' references: `one_process(k, extra=(), steps=4)` is train_losses of one process with those
    flags, run once per session however many tests compare against it."""
    cache = {}

    def get(k, extra=(), steps=4):
        key = (k, tuple(extra), steps)
        if key not in cache:
            cache[key] = train_losses(corpus, tmp_path_factory.mktemp("one_process"), k, 1, list(extra), steps)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def megatron_process():
    """megatron-core's parallel state for this test process: gloo, world size 1, TP=PP=1."""
    os.environ["MASTER_PORT"] = str(free_port())
    parallel.initialize(ParallelConfig(), seed=1234, launch=parallel.Launch(0, 1, 0))
    yield
    parallel.destroy()
