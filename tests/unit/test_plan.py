"""The two-phase plan: its arithmetic, its errors, tools/plan.py, and a full plan run in one command == the same
plan run one phase per command (job chaining), each phase consuming the tokens the plan gives it."""

import json

import pytest

from helpers import PYTHON, TINY, run
from megatron_patch.config.flags import PLAN_REQUIRED, parse_args
from megatron_patch.config.plan import make_plan, phase_config, phases_to_run
from megatron_patch.config.schema import ConfigError
from megatron_patch.training import json_log


def _plan_args(*flags, k=4, fraction=2 / 3, seq=2048, batch=1024, budget=("--train-iters", "3000")):
    return ["--patch-size", str(k), "--patch-fraction", str(fraction), "--seq-length", str(seq),
            "--global-batch-size", str(batch), *budget, "--lr", "3e-4", "--lr-warmup-iters", "20", "--save", "ckpt",
            *flags]


def _parsed(*flags, **kwargs):
    """The config tools/plan.py reads from _plan_args (no model flags needed)."""
    return parse_args(_plan_args(*flags, **kwargs), required=PLAN_REQUIRED)


def test_paper_recipe():
    """K=4, lambda=2/3: phase 1 reads 256 samples of 8192 tokens (2048 patches), phase 2 1024 samples of 2048
    tokens, the same 2M tokens per step, at half the cost of token-level training."""
    plan = make_plan(_parsed(budget=("--train-tokens", str(3000 * 1024 * 2048))))
    p1, p2 = plan.phases
    assert (p1.patch_size, p1.seq_length, p1.global_batch_size, p1.train_iters) == (4, 8192, 256, 2000)
    assert (p2.patch_size, p2.seq_length, p2.global_batch_size, p2.train_iters) == (1, 2048, 1024, 1000)
    assert p1.seq_length * p1.global_batch_size == p2.seq_length * p2.global_batch_size == plan.tokens_per_step
    assert plan.cost == pytest.approx(0.5)
    assert p1.train_data_range == (0.0, 2 / 3) and p2.train_data_range == (2 / 3, 1.0)
    assert p2.pretrained_checkpoint == p1.save == "ckpt/phase1" and p2.save == "ckpt/phase2"


@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("fraction", [0.25, 0.5, 2 / 3, 0.9])
@pytest.mark.parametrize("iters", [7, 100, 12345])
def test_budget_is_split_in_whole_iterations(k, fraction, iters):
    plan = make_plan(_parsed("--lr-warmup-iters", "0", k=k, fraction=fraction, batch=64,
                             budget=("--train-iters", str(iters))))
    p1, p2 = plan.phases
    assert p1.train_iters + p2.train_iters == iters
    assert abs(p1.train_iters - fraction * iters) <= 0.5  # the nearest whole number of iterations
    assert p1.tokens + p2.tokens == iters * plan.tokens_per_step
    assert plan.patch_fraction == p1.train_iters / iters
    assert plan.cost == pytest.approx(plan.patch_fraction / k + 1 - plan.patch_fraction)
    assert p1.train_data_range[1] == p2.train_data_range[0] == plan.patch_fraction


def test_token_budget_rounds_up_to_whole_steps():
    plan = make_plan(_parsed("--lr-warmup-iters", "0", seq=100, batch=8,
                             budget=("--train-tokens", "10001")))
    assert plan.total_iters == 13  # 10001 tokens / 800 per step


def test_each_phase_is_an_ordinary_phase_config():
    cfg = _parsed("--log-json", "logs/run.jsonl")
    p1, p2 = (phase_config(cfg, p) for p in make_plan(cfg).phases)
    assert (p1.patch_size, p1.seq_length, p1.global_batch_size, p1.save, p1.load) == (
        4, 8192, 256, "ckpt/phase1", "ckpt/phase1")
    assert p1.pretrained_checkpoint is None and p2.pretrained_checkpoint == "ckpt/phase1"
    assert (p1.log_json, p2.log_json) == ("logs/run.phase1.jsonl", "logs/run.phase2.jsonl")
    assert p1.plan.patch_fraction is None and cfg.patch_size == 4  # the plan's own config is untouched


@pytest.mark.parametrize("flags,message", [
    (_plan_args(fraction=1.0), "--patch-fraction must be between 0 and 1"),
    (_plan_args(k=1), "--patch-fraction needs --patch-size K > 1"),
    (_plan_args(batch=1022), "--global-batch-size (phase 2's samples per step) divisible by --patch-size 4"),
    (_plan_args(fraction=0.0001), "leaves a phase with no iterations"),
    (_plan_args("--load", "x"), "drop --load"),
    (_plan_args("--lr-decay-iters", "100"), "drop --lr-decay-iters"),
    (_plan_args("--lr-warmup-iters", "1000"), "--lr-warmup-iters (per phase) 1000 must be smaller than phase2's"),
    (_plan_args("--phase1-lr-warmup-iters", "2000"), "--phase1-lr-warmup-iters 2000 must be smaller than phase1's"),
    (_plan_args("--phase2-lr", "1e-5", "--min-lr", "3e-5"), "--phase2-lr 1e-05 is below --min-lr 3e-05"),
    ([a for a in _plan_args() if a not in ("--save", "ckpt")], "a two-phase plan needs --save"),
])
def test_bad_plans_are_config_errors(flags, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_plan(parse_args(flags, required=PLAN_REQUIRED))


def test_each_phase_can_have_its_own_peak_lr_and_warmup():
    cfg = _parsed("--lr", "1e-3", "--phase1-lr", "2e-3",
                  "--phase2-lr-warmup-iters", "0")
    p1, p2 = (phase_config(cfg, p) for p in make_plan(cfg).phases)
    assert (p1.optim.lr, p1.optim.lr_warmup_iters) == (2e-3, 20)  # its own LR, the run's warmup
    assert (p2.optim.lr, p2.optim.lr_warmup_iters) == (1e-3, 0)  # the run's LR, its own warmup
    with pytest.raises(ConfigError, match=r"^--phase2-lr sets a phase of a two-phase plan: give --patch-fraction"):
        phases_to_run(parse_args(["--train-iters", "10", "--phase2-lr", "1e-3"], required=()), 1)


def test_phase1_alone_can_raise_the_embedding_and_output_layer_lr():
    """--phase1-decoupled-lr (RESULTS.md: it leaves the unigram plateau sooner) reaches phase 1's optimizer only;
    --decoupled-min-lr goes with it, and --decoupled-lr stays the default of both phases."""
    cfg = _parsed("--phase1-decoupled-lr", "1e-2", "--decoupled-min-lr", "1e-3")
    plan = make_plan(cfg)
    p1, p2 = (phase_config(cfg, p) for p in plan.phases)
    assert (p1.optim.decoupled_lr, p1.optim.decoupled_min_lr) == (1e-2, 1e-3)
    assert (p2.optim.decoupled_lr, p2.optim.decoupled_min_lr) == (None, None)
    assert "lr 0.0003, warmup 20, embedding and output layer lr 0.01; save" in plan.describe()
    both = _parsed("--decoupled-lr", "5e-3", "--phase2-decoupled-lr", "2e-3")
    assert [phase_config(both, p).optim.decoupled_lr for p in make_plan(both).phases] == [5e-3, 2e-3]
    with pytest.raises(ConfigError, match=r"^--decoupled-min-lr needs --decoupled-lr or a --phaseN-decoupled-lr"):
        make_plan(_parsed("--decoupled-min-lr", "1e-3"))


def test_plan_cli_prints_the_plan():
    as_json = json.loads(run([PYTHON, "tools/plan.py", *_plan_args(), "--json"]).stdout)
    assert [p["train_iters"] for p in as_json["phases"]] == [2000, 1000]
    assert as_json["cost"] == pytest.approx(0.5) and as_json["tokens_per_step"] == 1024 * 2048
    text = run([PYTHON, "tools/plan.py", *_plan_args()]).stdout
    assert "phase1 (patch, K=4): 2000 iterations x 256 samples x 8192 tokens" in text
    bad = run([PYTHON, "tools/plan.py", *_plan_args(batch=6)], check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "divisible by --patch-size" in bad.stderr


def _read(path):
    return [r["loss"] for r in json_log.steps(path).values()], json_log.last_summary(path)


def test_one_command_runs_the_plan_like_one_command_per_phase(corpus, tmp_path):
    def plan_run(out, *phase, check=True):
        return run([PYTHON, "pretrain_patch_gpt.py", *TINY, "--patch-size", "4", "--patch-fraction",
                    "0.6", "--seq-length", "32", "--micro-batch-size", "4", "--global-batch-size", "16",
                    "--train-iters", "10", "--lr", "3e-3", "--lr-warmup-iters", "1", "--eval-iters", "1",
                    "--phase1-lr", "5e-3", "--phase2-lr", "1e-3", "--phase2-lr-warmup-iters", "0",
                    "--ckpt-format", "torch",
                    "--data-path", corpus["aligned4"], "--tokenizer-model", corpus["tokenizer"],
                    "--data-cache-path", str(tmp_path / "cache"), "--save", str(out),
                    "--log-json", str(out / "log.jsonl"), *phase], check=check)

    whole = plan_run(tmp_path / "whole")
    # An early exit in phase 1 ends the command: phase 2 must start from phase 1's final weights, not these.
    stopped = plan_run(tmp_path / "stopped", "--exit-interval", "4")
    assert "phase1: stopped at iteration 4 of 6; the next phase waits: rerun the same command" in stopped.stdout
    assert not (tmp_path / "stopped" / "phase2").exists()
    plan_run(tmp_path / "stopped")
    assert "phase1 (patch, K=4): 6 iterations x 4 samples x 128 tokens = 3072 tokens" in whole.stdout
    # Each phase's own peak LR and warmup: phase 1 warms up in one step (at LR 0, as Megatron's scheduler starts)
    # to 5e-3; phase 2 starts at its peak, 1e-3.
    lrs = {phase: [r["lr"] for r in json_log.steps(tmp_path / "whole" / f"log.{phase}.jsonl").values()]
           for phase in ("phase1", "phase2")}
    assert lrs["phase1"][:2] == [0.0, pytest.approx(5e-3)] and lrs["phase2"][0] == pytest.approx(1e-3)
    early = plan_run(tmp_path / "chained", "--phase", "2", check=False)
    assert early.returncode == 2 and "--phase 2: phase 1 has not finished" in early.stderr
    plan_run(tmp_path / "chained", "--phase", "1")
    plan_run(tmp_path / "chained", "--phase", "2")
    for phase, tokens in (("phase1", 6 * 512), ("phase2", 4 * 512)):
        losses, summary = _read(tmp_path / "whole" / f"log.{phase}.jsonl")
        chained_losses, _ = _read(tmp_path / "chained" / f"log.{phase}.jsonl")
        assert losses == chained_losses  # bitwise: a phase is the same config whichever command runs it
        assert _read(tmp_path / "stopped" / f"log.{phase}.jsonl")[0] == losses  # and however often it stops
        assert summary["tokens"] == tokens and len(losses) == tokens // 512
    assert "already complete" in plan_run(tmp_path / "whole").stdout  # a rerun (e.g. a requeued job) skips
