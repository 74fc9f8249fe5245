"""Experiment tracking: TensorBoard events and a W&B offline run hold the scalars, the compute axis continues from
phase 1 into phase 2, a two-phase plan costs lambda/K + 1 - lambda of token-only training in model FLOPs, and
training needs neither backend."""

import glob
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import PYTHON, ROOT, phase_flags, plan_flags, run
from megatron_patch.training import json_log


@pytest.fixture(scope="module")
def tracked(corpus, tmp_path_factory):
    """A two-phase plan (lambda 0.75, K=4) with TensorBoard and an offline W&B run."""
    out = tmp_path_factory.mktemp("tracked")
    run([PYTHON, "pretrain_patch_gpt.py", *plan_flags(corpus, out, 0.75, [
        "--tensorboard-dir", str(out / "tb"), "--wandb-project", "test", "--wandb-save-dir", str(out),
        "--log-validation-ppl-to-tensorboard", "--log-memory-to-tensorboard", "--log-throughput"])],
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    return out


def test_tensorboard_holds_the_scalars_on_the_runs_token_axis(tracked):
    events = EventAccumulator(str(tracked / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "throughput/tokens_per_sec", "throughput/tflops_per_device",
            "throughput/mfu", "memory/peak_bytes", "valid/valid_loss", "valid/token_level_valid_loss",
            "valid/token_level_valid_ppl", "compute/cumulative_flops", "train/patch_size"} <= tags
    losses = events.Scalars("train/loss")
    # Both phases on one axis: 8 steps of 1024 tokens, phase 2 continuing where phase 1 ended.
    assert [e.step for e in losses] == [1024 * i for i in range(1, 9)]
    steps = json_log.steps(str(tracked / "log.phase1.jsonl")) | {
        6 + i: r for i, r in json_log.steps(str(tracked / "log.phase2.jsonl")).items()}
    assert [e.value for e in losses] == pytest.approx([steps[i]["loss"] for i in range(1, 9)])
    assert [e.value for e in events.Scalars("train/patch_size")] == [4] * 6 + [1] * 2


def test_wandb_offline_run_holds_the_history(tracked):
    runs = sorted(glob.glob(str(tracked / "wandb" / "offline-run-*")))
    assert len(runs) == 2  # one per phase
    histories = [path for run_dir in runs for path in glob.glob(f"{run_dir}/*.wandb")]
    data = b"".join(open(path, "rb").read() for path in histories)
    # The run files record every logged key by name (protobuf records).
    assert b"train/loss" in data and b"cumulative_tokens" in data and b"valid/token_level_valid_loss" in data


def test_compute_axis_continues_and_the_plan_costs_lambda_over_k_plus_one_minus_lambda(tracked, corpus, tmp_path):
    p1 = json_log.last_summary(str(tracked / "log.phase1.jsonl"))
    p2 = json_log.last_summary(str(tracked / "log.phase2.jsonl"))
    first_phase2_step = json_log.steps(str(tracked / "log.phase2.jsonl"))[1]
    assert first_phase2_step["cumulative_tokens"] == p1["cumulative_tokens"] + 1024
    assert first_phase2_step["cumulative_flops"] > p1["cumulative_flops"]
    run([PYTHON, "pretrain_patch_gpt.py", *plan_flags(corpus, tmp_path, 0)])
    baseline = json_log.last_summary(str(tmp_path / "log.jsonl"))
    assert baseline["cumulative_tokens"] == p2["cumulative_tokens"] == 8 * 1024
    # lambda = 6/8 at K=4: 0.75/4 + 0.25 = 0.4375 of the token-only FLOPs, exactly (same positions per sample,
    # the output layer included on both sides; flops.py).
    assert p2["cumulative_flops"] / baseline["cumulative_flops"] == pytest.approx(0.75 / 4 + 0.25, rel=1e-12)


def test_training_needs_neither_backend_and_asking_for_a_missing_one_is_one_line(corpus, tmp_path):
    hide = "import runpy, sys; sys.modules.update(wandb=None, tensorboard=None); sys.argv = sys.argv[1:]; " \
           f"runpy.run_path('{ROOT}/pretrain_patch_gpt.py', run_name='__main__')"
    flags = phase_flags(corpus, tmp_path, 4, ["--log-json", str(tmp_path / "log.jsonl")], steps=2)
    run([PYTHON, "-c", hide, "pretrain_patch_gpt.py", *flags])
    assert json_log.last_summary(str(tmp_path / "log.jsonl"))["iteration"] == 2
    result = run([PYTHON, "-c", hide, "pretrain_patch_gpt.py", *flags, "--tensorboard-dir", str(tmp_path / "tb")],
                 check=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "--tensorboard-dir needs the" in lines[0], result.stderr


def test_log_records_carry_the_compute_axis(tracked):
    records = json_log.read_records(str(tracked / "log.phase1.jsonl"))
    evals = [r["eval"] for r in records if "eval" in r]
    assert evals and all({"valid_loss", "token_level_valid_loss", "cumulative_tokens", "cumulative_flops"} <= e.keys()
                         for e in evals)
    assert json.dumps(records)  # plain JSON all the way
