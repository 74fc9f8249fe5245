"""megatron-core's distributed optimizer (with its overlaps) against the plain optimizer, and torch_dist checkpoints:
resumed bitwise, loaded into other layouts with the same next step, converted to and from the legacy format."""

import re

import pytest
import torch

from helpers import PP2, TORCH_DIST, TP2, assert_same_run, launcher, phase_flags, run, train_run
from megatron_patch.checkpoint import layout, storage
from megatron_patch.training import json_log

DISTOPT = ["--use-distributed-optimizer"]
OVERLAPS = [*DISTOPT, "--overlap-grad-reduce", "--overlap-param-gather"]


def _held_parameters(stdout):
    """(parameters whose optimizer state rank 0 holds, parameters of its model-parallel rank), as the run logged."""
    held, total = re.search(r"optimizer state .* on rank 0: ([\d,]+) of this model-parallel rank's ([\d,]+)",
                            stdout).groups()
    return int(held.replace(",", "")), int(total.replace(",", ""))


@pytest.mark.parametrize("nproc,flags,data_parallel", [(2, OVERLAPS, 2), (4, [*TP2, *DISTOPT], 2)],
                         ids=["dp2_overlaps", "tp2_dp2"])
def test_distributed_optimizer_gives_the_steps_of_one_process(corpus, tmp_path, one_process, nproc, flags,
                                                              data_parallel):
    """The same steps, and each data-parallel rank holds the optimizer state of 1/DP of the parameters."""
    series, stdout = train_run(corpus, tmp_path, 4, flags, launch=launcher(nproc))
    assert_same_run(one_process(4), series)
    held, total = _held_parameters(stdout)
    print(f"rank 0 holds the optimizer state of {held:,} of {total:,} parameters ({8 * held:,} bytes of fp32 "
          f"Adam moments against {8 * total:,} without the distributed optimizer)")
    assert held == pytest.approx(total / data_parallel, rel=0.01)


def _run(corpus, out, nproc, extra, steps, log):
    return run([*launcher(nproc), "pretrain_patch_gpt.py", *phase_flags(corpus, out, 4, [*extra, "--log-json", log],
                                                                         steps)])


def test_distributed_optimizer_resumes_bitwise(corpus, tmp_path):
    """Stopped and saved at step 3 (with dropout), resumed to step 6: the steps of the run that never stopped. (The
    legacy format's distrib_optim.pt: the conversion test.)"""
    ckpt_format = "torch_dist"
    def steps(name, extra, count):
        log = str(tmp_path / f"{name}.jsonl")
        _run(corpus, tmp_path, 2, [*OVERLAPS, "--hidden-dropout", "0.1", "--ckpt-format", ckpt_format,
                                   "--save", str(tmp_path / name), "--load", str(tmp_path / name), *extra], count, log)
        return json_log.steps(log)

    reference = steps("reference", [], 6)
    resumed = steps("stopped", ["--exit-interval", "3"], 6)
    assert max(resumed) == 3 and layout.latest_iteration(str(tmp_path / "stopped")) == 3
    resumed = steps("stopped", [], 6)
    for iteration in range(1, 7):
        for key in ("loss", "grad_norm", "microbatch_losses", "lr"):
            assert resumed[iteration][key] == reference[iteration][key], (iteration, key)


def test_torch_dist_checkpoint_loads_into_other_layouts_with_the_same_next_step(corpus, tmp_path):
    """Written at TP=2 x PP=2 with the distributed optimizer; step 4 resumed from iteration 3 at TP=1 and at
    PP=2 x DP=2 (the optimizer state resharded too) equals step 4 of the run that wrote it."""
    saved = tmp_path / "tp2_pp2"
    _run(corpus, tmp_path, 4, [*TP2, *PP2, *DISTOPT, *TORCH_DIST, "--save", str(saved), "--save-interval", "3"], 4,
         str(tmp_path / "tp2_pp2.jsonl"))
    reference = json_log.steps(str(tmp_path / "tp2_pp2.jsonl"))[4]["loss"]
    layout.write_tracker(str(saved), 3)  # as if the run had stopped after iteration 3
    for name, nproc, parallel_flags in [("tp1", 1, []), ("pp2_dp2", 4, PP2)]:
        log = str(tmp_path / f"{name}.jsonl")
        result = _run(corpus, tmp_path, nproc, [*parallel_flags, *DISTOPT, "--load", str(saved)], 4, log)
        assert f"resumed from {saved} at iteration 3" in result.stdout
        assert list(json_log.steps(log)) == [4]
        assert json_log.steps(log)[4]["loss"] == pytest.approx(reference, rel=1e-5), name


def test_conversion_between_formats_round_trips(corpus, tmp_path):
    """legacy -> torch_dist -> legacy by resuming at the checkpoint's iteration with the other --ckpt-format (with
    the distributed optimizer: its distrib_optim.pt and its torch_dist form): the same weights and optimizer state
    come back, and the torch_dist copy continues with the legacy one's next step."""
    def convert(source, target, ckpt_format, steps=3, extra=()):
        log = str(tmp_path / f"{target}.jsonl")
        _run(corpus, tmp_path, 1, [*DISTOPT, "--ckpt-format", ckpt_format, "--load", str(tmp_path / source),
                                   "--save", str(tmp_path / target), *extra], steps, log)
        return json_log.steps(log)

    convert("none", "legacy", "torch")
    convert("legacy", "dist", "torch_dist")
    convert("dist", "back", "torch")
    first, back = (storage.read(str(tmp_path / name / "iter_0000003" / "mp_rank_00" / "model_optim_rng.pt"))
                   for name in ("legacy", "back"))
    for key in ("model", "optimizer", "iteration", "consumed_samples", "opt_param_scheduler"):
        assert_equal_trees(first[key], back[key])
    first, back = (torch.load(str(tmp_path / name / "iter_0000003" / "mp_rank_00" / "distrib_optim.pt"))
                   for name in ("legacy", "back"))
    assert_equal_trees(first, back)
    from_legacy = convert("legacy", "next_legacy", "torch", 4)[4]
    from_dist = convert("dist", "next_dist", "torch", 4)[4]
    assert all(from_legacy[key] == from_dist[key] for key in ("loss", "grad_norm", "microbatch_losses", "lr"))


def assert_equal_trees(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_equal_trees(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_equal_trees(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b
