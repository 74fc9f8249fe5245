"""DeepSpeed ZeRO through --deepspeed (gloo, CPU, the tiny fp32 model, 5 steps) against one process without
DeepSpeed: every ZeRO stage with DP=2 and with TP=2 x DP=2, ZeRO-1 with PP=2 x DP=2, the deepspeed launcher,
resume, the ZeRO-3 memory saving and the phase hand-off from ZeRO-3 shards."""

import json
import os
import re
import shutil

import pytest
import torch

from helpers import PYTHON, ROOT, assert_same_run, free_port, launcher, phase_flags, run, train_losses, train_run
from megatron_patch.checkpoint import reshard
from megatron_patch.checkpoint.layout import TRACKER, iteration_dir
from megatron_patch.training import json_log

STEPS = 5
LAYOUTS = {"dp2": (2, []), "tp2_dp2": (4, ["--tensor-model-parallel-size", "2"])}
# Every stage in both layouts; K alternates so both patch sizes meet every stage and layout at least once.
MATRIX = [(1, "dp2", 4), (2, "dp2", 1), (3, "dp2", 4), (1, "tp2_dp2", 1), (2, "tp2_dp2", 4), (3, "tp2_dp2", 1)]
K_OF = {(stage, layout): k for stage, layout, k in MATRIX}


def zero(stage):
    """The fp32 config file of a ZeRO stage (stage 0: zero1's file with DeepSpeed's override flag)."""
    return ["--deepspeed", "--deepspeed_config", f"{ROOT}/deepspeed_configs/zero{max(stage, 1)}_fp32.json",
            "--zero-stage", str(stage)]


def footprint(stdout):
    """The bytes of parameters and optimizer state rank 0 holds, as the run logged them."""
    return json.loads(re.search(r"deepspeed: ZeRO stage \d.*\((\{.*\})\)", stdout).group(1))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """One process without DeepSpeed, per patch size: step series and the directory of its checkpoints."""
    out = tmp_path_factory.mktemp("reference")
    return {k: (train_losses(corpus, out / f"k{k}", k, 1, ["--save", str(out / f"k{k}" / "ckpt")], STEPS),
                out / f"k{k}" / "ckpt") for k in (1, 4)}


@pytest.fixture(scope="module")
def zero_run(corpus, tmp_path_factory):
    """(series, stdout, checkpoint dir) of a MATRIX run, saving at steps 3 and 5; each runs once per module."""
    cache = {}

    def get(stage, layout):
        if (stage, layout) not in cache:
            out = tmp_path_factory.mktemp(f"zero{stage}_{layout}")
            nproc, flags = LAYOUTS[layout]
            extra = [*flags, *zero(stage), "--save", str(out / "ckpt"), "--save-interval", "3"]
            series, stdout = train_run(corpus, out, K_OF[(stage, layout)], extra, STEPS, launcher(nproc))
            cache[(stage, layout)] = series, stdout, out / "ckpt"
        return cache[(stage, layout)]

    return get


@pytest.fixture(scope="module")
def launcher_run(corpus, tmp_path_factory):
    """ZeRO-0 on 2 processes started by the deepspeed launcher (MASTER_ADDR given: it would take `hostname -I`)."""
    out = tmp_path_factory.mktemp("launcher")
    launch = [os.path.join(os.path.dirname(PYTHON), "deepspeed"), "--num_accelerators", "2",
              "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return train_run(corpus, out, 4, zero(0), STEPS, launch)


@pytest.mark.parametrize("stage,layout,k", MATRIX)
def test_zero_stage_matches_single_process(reference, zero_run, stage, layout, k):
    series, stdout, _ = zero_run(stage, layout)
    assert f"deepspeed: ZeRO stage {stage}," in stdout
    assert_same_run(reference[k][0], series)


def test_deepspeed_launcher_runs_zero0_like_one_process(reference, launcher_run):
    series, stdout = launcher_run
    assert "world size 2" in stdout and "deepspeed: ZeRO stage 0," in stdout
    assert_same_run(reference[4][0], series)


def test_pipeline_parallel_zero1_matches_single_process(corpus, tmp_path, start_checkpoint, one_process):
    # Pipeline stages initialise their layers differently from one process: both start from one checkpoint.
    common = ["--num-layers", "4", "--pretrained-checkpoint", start_checkpoint, "--micro-batch-size", "1"]
    series, _ = train_run(corpus, tmp_path, 4, [*common, "--pipeline-model-parallel-size", "2", *zero(1)],
                          launch=launcher(4))
    assert_same_run(one_process(4, common), series)


def test_pipeline_parallel_zero1_with_tied_embeddings_matches_single_process(corpus, tmp_path):
    """Tied input/output embeddings live on the first and the last stage: their gradients must be summed and
    counted once in the clipped norm."""
    common = ["--num-layers", "4", "--micro-batch-size", "1"]
    train_run(corpus, tmp_path, 4, [*common, "--lr-warmup-iters", "0", "--save", str(tmp_path / "start")], 1,
              tied=True)
    common += ["--pretrained-checkpoint", str(tmp_path / "start"), "--clip-grad", "0.5"]
    reference, _ = train_run(corpus, tmp_path, 4, common, STEPS, tied=True)
    pipelined, _ = train_run(corpus, tmp_path, 4, [*common, "--pipeline-model-parallel-size", "2", *zero(1)], STEPS,
                             launcher(4), tied=True)
    assert_same_run(reference, pipelined)


def test_zero2_with_pipeline_parallelism_is_one_line_error(corpus, tmp_path):
    # Configuration errors come before any process group: a 2-process world is enough to describe.
    flags = phase_flags(corpus, tmp_path, 4, ["--pipeline-model-parallel-size", "2", *zero(2)])
    result = run([PYTHON, f"{ROOT}/pretrain_patch_gpt.py", *flags], check=False,
                 env={"WORLD_SIZE": "2", "RANK": "0"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "pretrain_patch_gpt: error: ZeRO stage 2 with --pipeline-model-parallel-size 2: use ZeRO stage 1 "
        "(--zero-stage 1) with pipeline parallelism; DeepSpeed partitions gradients/parameters only without "
        "pipeline parallelism"]


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_from_step_3_matches_uninterrupted_run(corpus, tmp_path, zero_run, stage):
    series, _, saved = zero_run(stage, "dp2")
    # The checkpoint the run wrote at step 3, as the latest one of a fresh directory.
    resume_dir = tmp_path / "ckpt"
    shutil.copytree(iteration_dir(str(saved), 3), iteration_dir(str(resume_dir), 3))
    (resume_dir / TRACKER).write_text("3\n")
    resumed, stdout = train_run(corpus, tmp_path, K_OF[(stage, "dp2")], [*zero(stage), "--load", str(resume_dir)],
                                STEPS, launcher(2))
    assert "resumed from" in stdout and "at iteration 3" in stdout
    assert resumed[0] == series[0][3:] and resumed[1] == series[1][3:]  # bit-identical steps 4 and 5


def test_zero3_shards_parameters_and_optimizer_state(zero_run, launcher_run):
    unsharded = footprint(launcher_run[1])  # ZeRO-0, DP=2: every rank holds everything
    sharded = footprint(zero_run(3, "dp2")[1])
    ratio = sum(sharded.values()) / sum(unsharded.values())
    print(f"rank 0 parameter + optimizer bytes: ZeRO-0 {unsharded}, ZeRO-3 {sharded}, ratio {ratio:.3f}")
    assert sharded["parameter_bytes"] < 0.6 * unsharded["parameter_bytes"]
    assert ratio < 0.6


def test_phase2_under_deepspeed_starts_from_zero3_phase1(corpus, tmp_path, reference, zero_run):
    """The fp32 weights exported from ZeRO-3's shards are the weights one process trained, and a phase-2 engine
    (fresh optimizer) started from them trains like phase 2 started from the one-process phase 1."""
    _, _, zero3_dir = zero_run(3, "dp2")  # phase 1: K=4 under ZeRO-3
    exported = reshard.full_state_dict(iteration_dir(str(zero3_dir), STEPS), {})
    trained = reshard.full_state_dict(iteration_dir(str(reference[4][1]), STEPS), {})
    assert exported.keys() == trained.keys() and len(exported) > 10
    for name, tensor in trained.items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=1e-5, msg=name)
    # Phase 2: K=1, 32 tokens per sample.
    series, stdout = train_run(corpus, tmp_path, 1, [*zero(2), "--pretrained-checkpoint", str(zero3_dir)], STEPS)
    assert "initialised weights from" in stdout and "fresh optimizer" in stdout
    assert_same_run(train_losses(corpus, tmp_path, 1, 1, ["--pretrained-checkpoint", str(reference[4][1])], STEPS),
                    series)


def test_a_two_phase_plan_under_deepspeed_gives_the_plan_without(corpus, tmp_path):
    """Both phases of a plan in one command, ZeRO-2 on 2 processes (phase 2's fresh engine from phase 1's
    exported weights) == the same plan without DeepSpeed on one process."""
    def phase_losses(out, launch, extra):
        run([*launch, f"{ROOT}/pretrain_patch_gpt.py", *phase_flags(corpus, out, 4, [
            "--patch-fraction", "0.6", "--seq-length", "32", "--global-batch-size", "16", "--micro-batch-size", "2",
            "--save", str(out / "ckpt"), "--log-json", str(out / "log.jsonl"), *extra], steps=10)])
        losses = []
        for phase in ("phase1", "phase2"):
            losses.append([r["loss"] for r in json_log.steps(str(out / f"log.{phase}.jsonl")).values()])
        return losses

    without = phase_losses(tmp_path / "plain", [PYTHON], [])
    with_zero2 = phase_losses(tmp_path / "zero2", launcher(2), zero(2))
    for ours, theirs in zip(without, with_zero2):
        assert len(ours) == len(theirs) > 1 and ours == pytest.approx(theirs, rel=1e-5)


def test_full_recompute_under_zero1_gives_the_steps_of_one_process(corpus, tmp_path, reference):
    """megatron-core's activation recompute inside a DeepSpeed engine (ZeRO-1, DP=2)."""
    recompute = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    series = train_losses(corpus, tmp_path, 4, 2, [*zero(1), *recompute], STEPS)
    assert_same_run(reference[4][0], series)
