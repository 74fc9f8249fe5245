"""Checkpoints that survive: a kill during a save leaves the previous checkpoint usable, a diverged run keeps the
last good one, and resuming on another model, tokenizer or dataset is a clear error, not silent garbage."""

import math
import os
import subprocess
import time

import pytest

from helpers import PYTHON, ROOT, free_port, phase_flags, run
from megatron_patch.checkpoint.layout import TRACKER, latest_iteration
from megatron_patch.config.flags import parse_args
from megatron_patch.config.schema import ConfigError
from megatron_patch.training import json_log
from megatron_patch.training.trainer import Trainer


@pytest.fixture(scope="module")
def other_tokenizer(corpus, tmp_path_factory):
    """A tokenizer of the same size trained on other text: ids mean other things."""
    out = tmp_path_factory.mktemp("other_tok")
    with open(corpus["jsonl"]) as f:
        (out / "docs.jsonl").write_text("".join(f.readlines()[80:]))
    run([PYTHON, "tools/train_tokenizer.py", "--input", str(out / "docs.jsonl"), "--model-prefix", str(out / "tok"),
         "--vocab-size", "1000"])
    return str(out / "tok.model")


@pytest.mark.parametrize("change,message", [
    (["--hidden-size", "128"], "hidden_size=64 (this run: 128, --hidden-size)"),
    (["--seq-length", "64"], "seq_length=128 (this run: 64, --seq-length)"),
    (["--seed", "5"], "seed=1234 (this run: 5, --seed)"),
    (["--train-data-range", "0", "0.5"], "train_data_range=[0.0, 1.0] (this run: [0.0, 0.5]"),
    ("plain", "different --data-path datasets"),
    ("tokenizer", "a different --tokenizer-model file"),
])
def test_resuming_with_another_model_data_or_tokenizer_is_a_clear_error(
        megatron_process, saved, corpus, other_tokenizer, change, message):
    flags, ckpt = saved
    if isinstance(change, str):
        change = {"plain": ["--data-path", corpus["plain"]],
                  "tokenizer": ["--tokenizer-model", other_tokenizer]}[change]
    cfg = parse_args([*flags, "--load", ckpt, *change]).resolve(world_size=1)
    with pytest.raises(ConfigError, match=f"--load {ckpt} \\(iteration 2\\) was trained with .*"
                                          + message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        Trainer(cfg).load()


def test_phase_handoff_checks_shape_and_tokenizer_but_not_sampling(megatron_process, saved, other_tokenizer):
    flags, ckpt = saved
    handoff = [*flags, "--pretrained-checkpoint", ckpt, "--patch-size", "1", "--seq-length", "32", "--seed", "9"]
    Trainer(parse_args(handoff).resolve(world_size=1)).load()  # another K, sample length and seed: fine
    for change, message in ((["--num-layers", "4"], "num_layers=2 \\(this run: 4"),
                            (["--tokenizer-model", other_tokenizer], "a different --tokenizer-model")):
        with pytest.raises(ConfigError, match=f"--pretrained-checkpoint {ckpt} .*was trained with {message}"):
            Trainer(parse_args([*handoff, *change]).resolve(world_size=1)).load()


def test_guard_errors_reach_the_user_as_one_line(saved):
    flags, ckpt = saved
    result = run([PYTHON, "pretrain_patch_gpt.py", *flags, "--load", ckpt, "--hidden-size", "128"], check=False)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "was trained with hidden_size=64" in lines[0], result.stderr


def test_divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    # An absurd LR: step 1 computes a finite loss and Adam moves every weight by ~1e30; the loss of step 2 is not
    # finite, which must stop the run before anything else is saved.
    ckpt = tmp_path / "ckpt"
    result = run([PYTHON, "pretrain_patch_gpt.py", *phase_flags(corpus, tmp_path, 4, [
        "--lr", "1e30", "--lr-warmup-iters", "0", "--save", str(ckpt), "--save-interval", "1"], steps=10)],
        check=False)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "is nan at iteration 2; stopped without saving: the last good checkpoint" in lines[0]
    assert f"{ckpt}/iter_0000001, is kept" in lines[0]
    assert latest_iteration(str(ckpt)) == 1 and sorted(os.listdir(ckpt)) == sorted(["iter_0000001", TRACKER])


def test_no_check_for_nan_in_loss_and_grad_trains_on_as_in_megatron_lm(corpus, tmp_path):
    log = tmp_path / "run.jsonl"
    run([PYTHON, "pretrain_patch_gpt.py", *phase_flags(corpus, tmp_path, 4, [
        "--lr", "1e30", "--lr-warmup-iters", "0", "--no-check-for-nan-in-loss-and-grad", "--log-json", str(log),
        "--log-interval", "1"], steps=3)])
    steps = [record for record in json_log.read_records(str(log)) if "loss" in record]
    values = [step[key] for step in steps for key in ("loss", "grad_norm")]
    assert len(steps) == 3 and math.isfinite(values[0]) and not all(map(math.isfinite, values)), values


def test_kill_during_a_save_leaves_the_previous_checkpoint_and_resume_finishes(corpus, tmp_path):
    """SIGKILL while a shard is being written (a model big enough for the write to take a while)."""
    ckpt = tmp_path / "ckpt"
    args = [PYTHON, "pretrain_patch_gpt.py", *phase_flags(corpus, tmp_path, 4, [
        "--num-layers", "4", "--hidden-size", "256", "--ffn-hidden-size", "704", "--save", str(ckpt),
        "--load", str(ckpt), "--save-interval", "1", "--ckpt-format", "torch"], steps=6)]
    proc = subprocess.Popen(args, cwd=ROOT, env=dict(os.environ, MASTER_PORT=str(free_port())),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard_in_progress = None
    deadline = time.time() + 120
    while shard_in_progress is None and proc.poll() is None and time.time() < deadline:
        partial = list(ckpt.glob("iter_*.tmp/mp_rank_00/model_optim_rng.pt.tmp"))
        # The second save, so there is a previous checkpoint to keep.
        shard_in_progress = next((p for p in partial if "iter_0000002" in str(p)), None)
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    assert shard_in_progress is not None, "the run was never caught writing its second checkpoint"
    assert latest_iteration(str(ckpt)) == 1 and (ckpt / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt").is_file()
    assert not (ckpt / "iter_0000002").exists()
    resumed = run(args)
    assert f"resumed from {ckpt} at iteration 1" in resumed.stdout
    assert latest_iteration(str(ckpt)) == 6 and not list(ckpt.glob("*.tmp*"))
