"""--fp16 on parallel layouts against one process: the same losses, loss scales and skipped steps. Tensor
parallelism with the dynamic scale; data parallelism (distributed optimizer) with a static scale, because each
rank's backward sees the loss of 1/DP of the micro-batches, DP times larger than one process's, so near the
overflow threshold the dynamic scale may skip other steps (as in Megatron-LM)."""

import pytest

from helpers import ROOT, TP2, launcher, phase_flags, run
from megatron_patch.training import json_log

DYNAMIC = ["--fp16", "--initial-loss-scale", str(2 ** 21), "--hysteresis", "2", "--loss-scale-window", "3"]
STATIC = ["--fp16", "--loss-scale", "1024"]


def fp16_run(corpus, out, nproc, extra):
    log = out / f"run{nproc}.jsonl"
    run([*launcher(nproc), f"{ROOT}/pretrain_patch_gpt.py",
         *phase_flags(corpus, out, 4, [*extra, "--log-interval", "1", "--log-json", str(log)], steps=8)])
    steps = list(json_log.steps(str(log)).values())
    return [step["loss"] for step in steps], [(step["loss_scale"], step["skipped"]) for step in steps]


@pytest.mark.parametrize("scaling,layout", [(DYNAMIC, TP2), (STATIC, ["--use-distributed-optimizer"])],
                         ids=["tp2_dynamic", "dp2_distributed_optimizer_static"])
def test_fp16_steps_equal_one_process(corpus, tmp_path, scaling, layout):
    losses, scales = fp16_run(corpus, tmp_path, 1, scaling)
    parallel_losses, parallel_scales = fp16_run(corpus, tmp_path, 2, [*scaling, *layout])
    assert parallel_scales == scales
    assert parallel_losses == pytest.approx(losses, rel=1e-4)
    assert losses[-1] < losses[0]
    if scaling is DYNAMIC:
        assert any(skipped for _, skipped in scales) and not all(skipped for _, skipped in scales), scales
