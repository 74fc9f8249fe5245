"""Resume exactness across a kill -9 of a 2-process run, and the phase hand-off across layouts (resharding)."""

import itertools
import os
import signal
import subprocess
import time

import psutil
import pytest

from helpers import PP2, ROOT, TP2, launcher, phase_flags, run
from megatron_patch.checkpoint import layout
from megatron_patch.training import json_log

_LOG_IDS = itertools.count()


def test_kill_9_between_checkpoints_then_resume_gives_bitwise_the_same_steps(corpus, tmp_path):
    # Dropout on, so the resumed steps are the same only if every RNG stream is restored too.
    def flags(out):
        return [*launcher(2), "pretrain_patch_gpt.py", *phase_flags(corpus, tmp_path, 4, [
            "--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--save", str(out), "--load", str(out),
            "--save-interval", "5", "--log-json", str(out) + ".jsonl"], steps=24)]

    run(flags(tmp_path / "reference"))
    reference = json_log.steps(str(tmp_path / "reference") + ".jsonl")

    crashed, log = tmp_path / "crashed", str(tmp_path / "crashed") + ".jsonl"
    proc = subprocess.Popen(flags(crashed), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (
            os.path.exists(log) and max(json_log.steps(log), default=0) in (7, 12, 17)):
        time.sleep(0.01)  # just logged: midway between two checkpoints
    # torchrun and both workers (torchrun starts each in a session of its own), no chance to clean up.
    for victim in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        victim.send_signal(signal.SIGKILL)
    proc.wait()
    reached = max(json_log.steps(log))
    saved = layout.latest_iteration(str(crashed))
    assert 5 <= saved < reached < 24  # killed between checkpoints: steps after `saved` are lost and redone

    resumed = run(flags(crashed))
    assert f"resumed from {crashed} at iteration {saved}" in resumed.stdout
    after = json_log.steps(log)
    assert sorted(after) == list(range(1, 25))
    for iteration in range(saved + 1, 25):
        for key in ("loss", "grad_norm", "microbatch_losses", "lr"):
            assert after[iteration][key] == reference[iteration][key], (iteration, key)


def _flags(corpus, out, k, extra, tied, steps):
    return phase_flags(corpus, out, k, ["--num-layers", "4", *extra], steps, tied)


def _first_step_loss(corpus, out, layout, pretrained, tied):
    log = out / f"handoff{next(_LOG_IDS)}.jsonl"
    run([*launcher(2 if layout else 1), "pretrain_patch_gpt.py", *_flags(corpus, out, 1, [
        *layout, "--lr-warmup-iters", "0", "--pretrained-checkpoint", pretrained, "--log-json", str(log)], tied, 1)])
    return json_log.steps(str(log))[1]["loss"]



@pytest.mark.parametrize("source,target,tied", [(TP2, [], False), (PP2, [], False), ([], PP2, True)],
                         ids=["tp2_to_tp1", "pp2_to_pp1", "tied_pp1_to_pp2"])
def test_phase_handoff_to_another_layout_starts_from_the_same_loss(corpus, tmp_path, source, target, tied):
    """Phase 1 (K=4) in one layout; phase 2 (K=1) from its weights in the same layout and in another: the
    resharded weights give the same first loss. (Tied embeddings: one stage holds only the input embedding,
    a pipeline's last stage its own copy as the output layer.)"""
    phase1 = tmp_path / "phase1"
    run([*launcher(2 if source else 1), "pretrain_patch_gpt.py", *_flags(corpus, tmp_path, 4, [
        *source, "--save", str(phase1)], tied, 3)])
    same_layout = _first_step_loss(corpus, tmp_path, source, str(phase1), tied)
    resharded = _first_step_loss(corpus, tmp_path, target, str(phase1), tied)
    assert resharded == pytest.approx(same_layout, rel=1e-6, abs=0)
