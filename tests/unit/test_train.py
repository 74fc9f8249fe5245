"""The training entry point: a two-phase run on real text, the weights-only phase hand-off, and bad input."""

import os
import signal
import subprocess
import time

import pytest
import torch

from helpers import PYTHON, ROOT, TORCH_DIST, free_port, phase_flags, run
from megatron_patch.checkpoint import layout, reshard
from megatron_patch.compat.megatron_core import installed_version
from megatron_patch.config.flags import parse_args
from megatron_patch.training import json_log
from megatron_patch.training.trainer import Trainer


def sized_flags(corpus, out, k, seq_length, global_batch, iters, extra=()):
    """helpers.phase_flags with this file's sizes (later occurrences of a flag win)."""
    return phase_flags(corpus, out, k, [
        "--seq-length", str(seq_length), "--micro-batch-size", str(global_batch // 2),
        "--global-batch-size", str(global_batch), "--min-lr", "3e-4", "--lr-warmup-iters", "3",
        "--split", "95,5,0", "--eval-iters", "2", "--log-interval", "5", *extra,
    ], steps=iters)


def read_log(path):
    """(every step record as logged, repeats of a resumed run included; the last phase summary)"""
    return [r for r in json_log.read_records(str(path)) if "loss" in r], json_log.last_summary(str(path))


@pytest.fixture(scope="module")
def two_phase(corpus, tmp_path_factory):
    """Phase 1 (K=4, 128 tokens = 32 patches x 8 samples) then phase 2 (K=1, 32 tokens x 32 samples):
    the same 1024 tokens per step, phase 2 starting from phase 1's weights."""
    out = tmp_path_factory.mktemp("two_phase")
    run([PYTHON, "pretrain_patch_gpt.py", *sized_flags(corpus, out, 4, 128, 8, 40, [
        *TORCH_DIST, "--save", str(out / "phase1"), "--log-json", str(out / "phase1.jsonl")])])
    phase2 = sized_flags(corpus, out, 1, 32, 32, 40, [
        "--pretrained-checkpoint", str(out / "phase1"), "--save", str(out / "phase2"), "--load", str(out / "phase2"),
        "--log-json", str(out / "phase2.jsonl")])
    result = run([PYTHON, "pretrain_patch_gpt.py", *phase2])
    return {"out": out, "phase2_flags": phase2, "phase2_stdout": result.stdout}


def test_loss_goes_down_in_both_phases(two_phase):
    for phase in ("phase1", "phase2"):
        steps, summary = read_log(two_phase["out"] / f"{phase}.jsonl")
        assert len(steps) == 40
        # Averages of 5 steps: one step's loss moves by ~0.05 with its batch (the corpus is the running Python's
        # own documentation, so it differs between the 3.11 and 3.12 legs).
        losses = [step["loss"] for step in steps]
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, (phase, losses)
    p1 = read_log(two_phase["out"] / "phase1.jsonl")[1]
    p2 = read_log(two_phase["out"] / "phase2.jsonl")[1]
    # Phase 2 starts from what phase 1 learned, far below a fresh model's log(vocab) = log(1024) = 6.93.
    assert p2["first_train_loss"] < 6.5
    assert p1["patch_size"] == 4 and p2["patch_size"] == 1
    assert p1["tokens"] == p2["tokens"] == 40 * 1024  # same tokens per step in both phases


def test_phase2_starts_from_phase1_weights_with_a_fresh_optimizer(megatron_process, two_phase):
    assert "initialised weights from" in two_phase["phase2_stdout"]
    cfg = parse_args([f for f in two_phase["phase2_flags"]]).resolve(world_size=1)
    cfg.load = None  # the phase-2 run's own checkpoints are not what this test is about
    trainer = Trainer(cfg)
    trainer.load()
    root = str(two_phase["out"] / "phase1")
    assert layout.latest_iteration(root) == 40 and layout.read_run(root, 40)["config"]["patch_size"] == 4
    phase1 = reshard.full_state_dict(layout.iteration_dir(root, 40), {})  # one process: names as in the model
    (model,) = trainer.models
    ours = {name: tensor for name, tensor in model.state_dict().items() if isinstance(tensor, torch.Tensor)}
    assert ours.keys() == phase1.keys()
    for name, tensor in phase1.items():
        assert torch.equal(ours[name], tensor), name
    assert len(trainer.optimizer.optimizer.state) == 0  # no Adam moments: a fresh optimizer
    assert trainer.scheduler.num_steps == 0 and trainer.iteration == 0 and trainer.consumed_samples == 0


def test_checkpoint_directory_has_megatron_layout_and_tracker(two_phase):
    root = two_phase["out"] / "phase1"
    assert layout.latest_iteration(str(root)) == 40
    # torch_dist (the default): megatron-core's common state, metadata and every rank's .distcp shards
    # megatron-core 0.19 keeps the common state inside the .distcp shards; earlier releases write common.pt.
    common = {"common.pt"} if installed_version() < (0, 19) else set()
    assert {*common, "metadata.json", "run.json"} <= {p.name for p in (root / "iter_0000040").iterdir()}
    assert list((root / "iter_0000040").glob("*.distcp"))
    assert not list(root.glob("*.tmp*"))


@pytest.mark.parametrize("flags,message", [
    (["--patch-size", "4", "--seq-length", "130"], "--seq-length 130 must be a positive multiple of --patch-size 4"),
    (["--patch-size", "0"], "--patch-size must be >= 1"),
    (["--data-path", "/nonexistent/prefix"], "--data-path: /nonexistent/prefix.bin does not exist"),
    (["--no-such-flag", "1"], "pretrain_patch_gpt: error: 1 unknown flag: --no-such-flag (see --help)"),
])
def test_bad_input_is_one_clear_line_before_any_work(corpus, tmp_path, flags, message):
    args = sized_flags(corpus, tmp_path, 4, 128, 8, 5, ["--save", str(tmp_path / "ckpt")]) + flags
    result = run([PYTHON, "pretrain_patch_gpt.py", *args], check=False)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "cache").exists()


def test_split_without_documents_is_a_clear_error_not_a_hang(corpus, tmp_path):
    args = sized_flags(corpus, tmp_path, 4, 128, 8, 5) + ["--split", "999,1,0"]
    result = run([PYTHON, "pretrain_patch_gpt.py", *args], check=False, timeout=120)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "the valid split of --split 999,1,0 has no documents" in lines[0], result.stderr


def test_bf16_training_runs_and_learns(corpus, tmp_path):
    log = tmp_path / "bf16.jsonl"
    run([PYTHON, "pretrain_patch_gpt.py", *sized_flags(corpus, tmp_path, 4, 128, 8, 20, [
        "--bf16", "--log-json", str(log)])])
    steps, summary = read_log(log)
    assert len(steps) == 20 and summary["final_train_loss"] < summary["first_train_loss"] - 0.1, summary


def test_sigterm_checkpoints_the_current_step_exits_0_and_resume_finishes(corpus, tmp_path):
    ckpt, log = tmp_path / "ckpt", tmp_path / "run.jsonl"
    args = [PYTHON, "pretrain_patch_gpt.py", *sized_flags(corpus, tmp_path, 4, 128, 8, 300, [
        "--exit-signal-handler", "--save", str(ckpt), "--load", str(ckpt), "--log-json", str(log)])]
    env = dict(os.environ, MASTER_PORT=str(free_port()))
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 5):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    steps = read_log(log)[0]
    stopped = steps[-1]["iteration"]
    assert 5 <= stopped < 300 and f"stopping after iteration {stopped}: received SIGTERM" in stdout
    assert layout.latest_iteration(str(ckpt)) == stopped
    # Resumed for 3 more steps (the next iteration divisible by stopped + 3), not the remaining ~290.
    resumed = run([*args, "--exit-interval", str(stopped + 3)])
    assert f"resumed from {ckpt} at iteration {stopped}" in resumed.stdout
    iterations = [s["iteration"] for s in read_log(log)[0]]
    assert iterations == list(range(1, stopped + 4))  # every step exactly once
    assert layout.latest_iteration(str(ckpt)) == stopped + 3


def test_exit_interval_stops_after_a_divisible_iteration(corpus, tmp_path):
    result = run([PYTHON, "pretrain_patch_gpt.py", *sized_flags(corpus, tmp_path, 4, 128, 8, 20, [
        "--exit-interval", "7", "--save", str(tmp_path / "ckpt")])])
    assert "stopping after iteration 7: --exit-interval 7" in result.stdout
    assert layout.latest_iteration(str(tmp_path / "ckpt")) == 7
