"""--fp16 with megatron-core's loss scaling, on CPU (torch runs fp16 matmuls there; the tiny model trains at about
two thirds of its fp32 speed): an overflowing step is skipped and the scale backs off as Megatron-LM's does, a
skipped step changes no weight and does not advance the LR schedule, the scaler's state survives a resume, and
the divergence guard tells an overflow (skipped) from gradients no scale can save or a non-finite loss (stop)."""

import math

import pytest
import torch

from helpers import PYTHON, phase_flags, run
from megatron_patch.config.flags import parse_args
from megatron_patch.config.schema import ConfigError
from megatron_patch.training import json_log
from megatron_patch.training.trainer import Trainer

# Start high enough that the first steps overflow fp16, with a short window so the scale also grows again. One
# LR schedule for runs of any length, so that a shorter run's LRs are a longer one's first.
SCHEDULE = ["--lr-warmup-iters", "3", "--lr-decay-iters", "16", "--log-interval", "1"]
SCALING = ["--fp16", "--initial-loss-scale", str(2 ** 21), "--hysteresis", "2", "--loss-scale-window", "3"]


def logged_steps(corpus, out, extra, steps):
    """The --log-json step records of a short run of the tiny model at K=4."""
    log = out / "log.jsonl"
    run([PYTHON, "pretrain_patch_gpt.py", *phase_flags(corpus, out, 4, [*SCHEDULE, *extra, "--log-json", str(log)],
                                                       steps=steps)])
    return list(json_log.steps(str(log)).values())


def dynamic_scales(skipped, initial, minimum, window, hysteresis):
    """The loss scale each step uses, by Megatron-LM's rule: halve once `hysteresis` overflows have accumulated
    since the last growth (then at every further overflow), double after `window` clean steps in a row."""
    scale, growth, left, scales = initial, 0, hysteresis, []
    for overflow in skipped:
        scales.append(scale)
        if overflow:
            growth, left = 0, left - 1
            if left <= 0:
                scale = max(scale / 2, minimum)
        else:
            growth += 1
            if growth == window:
                growth, left, scale = 0, hysteresis, scale * 2
    return scales


def test_overflows_are_skipped_and_the_scale_follows_megatron_lms_rule(corpus, tmp_path):
    steps = logged_steps(corpus, tmp_path / "fp16", SCALING, steps=16)
    skipped = [step["skipped"] for step in steps]
    scales = [step["loss_scale"] for step in steps]
    assert scales == dynamic_scales(skipped, 2 ** 21, 1.0, 3, 2)
    assert any(skipped) and not all(skipped) and len(set(scales)) >= 3, scales  # backed off and grew again
    assert all(step["grad_norm"] is None for step in steps if step["skipped"])
    # The LR schedule advances on applied steps only: their LRs are an fp32 run's, step for step.
    applied = [step for step in steps if not step["skipped"]]
    fp32 = logged_steps(corpus, tmp_path / "fp32", [], steps=len(applied))
    assert [step["lr"] for step in applied] == pytest.approx([step["lr"] for step in fp32], rel=1e-12)
    assert "loss_scale" not in fp32[0]
    losses = [step["loss"] for step in applied]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0] - 0.1


def one_step(corpus, tmp_path, initial_loss_scale):
    """(trainer, stats of its first step, whether any weight changed) at the given initial loss scale."""
    flags = phase_flags(corpus, tmp_path, 4, ["--fp16", "--initial-loss-scale", str(initial_loss_scale),
                                              "--lr-warmup-iters", "0"], steps=4)
    trainer = Trainer(parse_args(flags).resolve(world_size=1))
    before = [p.detach().clone() for model in trainer.models for p in model.parameters()]
    assert all(p.dtype == torch.float16 for p in before)
    stats = trainer.train_step(trainer.data_iterators(trainer.build_datasets()[0], 0))
    after = [p.detach() for model in trainer.models for p in model.parameters()]
    return trainer, stats, any(not torch.equal(a, b) for a, b in zip(before, after))


def test_a_skipped_step_changes_no_weight_and_waits_in_the_lr_schedule(megatron_process, corpus, tmp_path):
    trainer, stats, changed = one_step(corpus, tmp_path / "overflow", 2.0 ** 40)
    assert stats["skipped"] and stats["grad_norm"] is None and not changed
    assert (trainer.iteration, trainer.consumed_samples, trainer.scheduler.num_steps) == (1, 8, 0)
    assert trainer.engine.loss_scale == 2.0 ** 40  # hysteresis 2: the first overflow does not halve yet
    trainer, stats, changed = one_step(corpus, tmp_path / "fits", 2.0 ** 10)
    assert not stats["skipped"] and math.isfinite(stats["grad_norm"]) and changed
    assert (trainer.iteration, trainer.scheduler.num_steps) == (1, 1)


def test_the_loss_scalers_state_survives_a_resume_in_both_formats(corpus, tmp_path):
    whole = logged_steps(corpus, tmp_path / "whole", SCALING, steps=10)
    for ckpt_format in ("torch", "torch_dist"):
        out = tmp_path / ckpt_format
        resume = [*SCALING, "--ckpt-format", ckpt_format, "--save", str(out / "ckpt"), "--load", str(out / "ckpt"),
                  "--train-iters", "10"]
        first = logged_steps(corpus, out / "first", [*resume, "--exit-interval", "5"], steps=10)
        second = logged_steps(corpus, out / "second", resume, steps=10)
        assert len(first) == 5 and len(second) == 5
        for key in ("loss", "loss_scale", "skipped", "lr"):
            assert [step[key] for step in first + second] == [step[key] for step in whole], (ckpt_format, key)


def diverged(corpus, tmp_path, extra):
    result = run([PYTHON, "pretrain_patch_gpt.py", *phase_flags(corpus, tmp_path, 4, ["--fp16", *extra], steps=40)],
                 check=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    return lines[0]


def test_gradients_that_overflow_at_the_minimum_scale_stop_the_run(corpus, tmp_path):
    line = diverged(corpus, tmp_path, ["--initial-loss-scale", str(2 ** 30), "--min-loss-scale", str(2 ** 30)])
    assert ("the gradients are not finite even at the minimum loss scale 1.07374e+09 (--min-loss-scale) at "
            "iteration 1; stopped without saving: no checkpoint was saved") in line


def test_a_non_finite_loss_stops_the_run_after_the_overflows_were_skipped(corpus, tmp_path):
    # An absurd LR: the first applied step sends fp16 weights to inf, the next loss is not finite.
    line = diverged(corpus, tmp_path, ["--lr", "1e30", "--lr-warmup-iters", "0", "--initial-loss-scale", "1024"])
    assert "loss is nan at iteration 2; stopped without saving" in line


def test_a_static_loss_scale_skips_every_overflow_as_megatron_lm_does(corpus, tmp_path):
    steps = logged_steps(corpus, tmp_path, ["--fp16", "--loss-scale", str(2 ** 30)], steps=3)
    assert [(step["skipped"], step["loss_scale"]) for step in steps] == [(True, 2.0 ** 30)] * 3


@pytest.mark.parametrize("extra,message", [
    (["--bf16"], "--fp16 and --bf16: choose one"),
    (["--deepspeed"], "--fp16 with --deepspeed is not supported here"),
    (["--min-loss-scale", "8", "--initial-loss-scale", "4"], "--min-loss-scale 8 is above --initial-loss-scale 4"),
])
def test_fp16_settings_that_cannot_work_are_refused(corpus, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(phase_flags(corpus, tmp_path, 4, ["--fp16", *extra])).resolve(world_size=1)
