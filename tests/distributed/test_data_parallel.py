"""Data parallelism (torchrun, gloo): DP=2 gives the losses of one process on the same global batch."""

import json

import pytest

from conftest import PYTHON, ROOT, TINY_MODEL_FLAGS, free_port, run

STEPS = 4


def losses(corpus, out, k, nproc):
    log = out / f"k{k}_dp{nproc}.jsonl"
    launcher = [PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
                str(free_port())] if nproc > 1 else [PYTHON]
    run([*launcher, f"{ROOT}/pretrain_patch_gpt.py", *TINY_MODEL_FLAGS, "--patch-size", str(k),
         "--seq-length", str(32 * k), "--micro-batch-size", "2", "--global-batch-size", "8",
         "--train-iters", str(STEPS), "--lr", "3e-3", "--lr-warmup-iters", "1", "--data-path", corpus["aligned4"],
         "--tokenizer-model", corpus["tokenizer"], "--data-cache-path", str(out / "cache"),
         "--eval-interval", "1000", "--eval-iters", "1", "--log-json", str(log)])
    with open(log) as f:
        records = [json.loads(line) for line in f]
    return [r["loss"] for r in records if "loss" in r], [r["grad_norm"] for r in records if "loss" in r]


@pytest.mark.parametrize("k", [1, 4])
def test_dp2_matches_single_process(corpus, tmp_path, k):
    single_loss, single_norm = losses(corpus, tmp_path, k, 1)
    dp_loss, dp_norm = losses(corpus, tmp_path, k, 2)
    assert len(single_loss) == len(dp_loss) == STEPS
    for a, b in zip(single_loss + single_norm, dp_loss + dp_norm):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (single_loss, dp_loss, single_norm, dp_norm)
    assert single_loss[-1] < single_loss[0]  # the steps really trained
