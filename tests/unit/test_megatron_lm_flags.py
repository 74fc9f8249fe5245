"""What Megatron-LM's flags do here: sample-based schedules give Megatron-LM's sample-based LR curve, warmup
fractions and WSD follow megatron-core's scheduler, --recipe paper is the paper's optimizer, --decoupled-lr gives
the embedding and output layer their own LR, --no-load-optim / --no-load-rng / --finetune resume what they say."""

import importlib.util
import json
import math
import re

import pytest
import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from helpers import PYTHON, phase_flags, run
from megatron_patch.config.flags import PLAN_REQUIRED, parse_args
from megatron_patch.config.plan import make_plan, phase_config
from megatron_patch.config.schema import ConfigError
from megatron_patch.distributed.step import lr_scheduler
from megatron_patch.method.model import transformer_config
from megatron_patch.training import json_log
from megatron_patch.training.trainer import Trainer


def _config(corpus, *flags):
    argv = ["--model-preset", "tiny", "--seq-length", "32", "--micro-batch-size", "8", "--global-batch-size", "8",
            "--lr", "1e-3", "--min-lr", "1e-4", "--data-path", corpus["aligned4"], "--tokenizer-model",
            corpus["tokenizer"], *flags]
    return parse_args(argv).resolve(world_size=1)


def _lrs(optim, steps):
    """The LR of each of `steps` iterations under the scheduler the trainer builds from `optim`."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    scheduler = lr_scheduler(optimizer, optim)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        scheduler.step(increment=1)
    return out


@pytest.mark.parametrize("warmup,decay", [(16, 64), (20, 70)])  # whole iterations of 8 samples, and between them
def test_a_sample_based_schedule_is_megatron_lm_s(corpus, warmup, decay):
    cfg = _config(corpus, "--train-samples", "84", "--lr-warmup-samples", str(warmup), "--lr-decay-samples",
                  str(decay), "--lr-decay-style", "cosine")
    assert cfg.train_iters == 10  # 84 // 8, Megatron-LM's floor
    # Megatron-LM's own sample-based scheduler: steps counted in samples, stepped by the global batch.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    megatron = OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=1e-3, min_lr=1e-4, lr_warmup_steps=warmup,
                                       lr_decay_steps=decay, lr_decay_style="cosine", start_wd=0.01, end_wd=0.01,
                                       wd_incr_steps=84, wd_incr_style="constant")
    expected = []
    for _ in range(10):
        expected.append(optimizer.param_groups[0]["lr"])
        megatron.step(increment=8)
    assert _lrs(cfg.optim, 10) == pytest.approx(expected, rel=1e-12)
    if warmup % 8 == 0:  # whole iterations: the same as the iteration-based flags
        by_iters = _config(corpus, "--train-iters", "10", "--lr-warmup-iters", str(warmup // 8), "--lr-decay-iters",
                           str(decay // 8), "--lr-decay-style", "cosine")
        assert _lrs(by_iters.optim, 10) == pytest.approx(expected, rel=1e-12)


def test_wsd_holds_the_peak_then_decays_over_its_last_iterations(corpus):
    cfg = _config(corpus, "--train-iters", "12", "--lr-warmup-iters", "2", "--lr-decay-style", "WSD",
                  "--lr-wsd-decay-iters", "4", "--lr-wsd-decay-style", "linear")
    lrs = _lrs(cfg.optim, 13)
    expected = [0.0, 5e-4] + [1e-3] * 7 + [1e-4 + (1 - k / 4) * 9e-4 for k in range(1, 5)]  # decay over 9..12
    assert lrs == pytest.approx(expected, rel=1e-12)
    isr = _lrs(_config(corpus, "--train-iters", "12", "--lr-warmup-iters", "4",
                       "--lr-decay-style", "inverse-square-root").optim, 13)
    assert isr[4:] == pytest.approx([max(1e-4, 1e-3 * math.sqrt(4 / n)) for n in range(4, 13)], rel=1e-12)


def test_a_warmup_fraction_is_of_each_phase(corpus):
    single = _config(corpus, "--train-iters", "40", "--lr-warmup-fraction", "0.1")
    assert single.optim.lr_warmup_iters == pytest.approx(4)
    cfg = parse_args(["--patch-size", "4", "--patch-fraction", "0.75", "--seq-length", "32", "--global-batch-size",
                      "8", "--train-samples", "320", "--lr", "1e-3", "--lr-warmup-fraction", "0.1", "--save", "c"],
                     required=PLAN_REQUIRED)
    plan = make_plan(cfg)
    assert [p.train_iters for p in plan.phases] == [30, 10]  # 320 samples of 8 per step
    assert [phase_config(cfg, p).optim.lr_warmup_iters for p in plan.phases] == pytest.approx([3, 1])


@pytest.mark.parametrize("flags,message", [
    (["--train-iters", "10", "--lr-warmup-samples", "8"], "--lr-warmup-samples needs --train-samples"),
    (["--train-samples", "80", "--lr-decay-iters", "5"], "--train-samples: give the schedule in samples too"),
    (["--train-samples", "80", "--train-iters", "10"], "give exactly one of --train-iters, --train-tokens and"),
    (["--train-samples", "4"], "--train-samples 4 is less than one step of --global-batch-size 8"),
    (["--train-iters", "10", "--lr-warmup-iters", "2", "--lr-warmup-fraction", "0.1"],
     "give one of --lr-warmup-fraction and --lr-warmup-iters"),
    (["--train-iters", "10", "--lr-decay-style", "WSD"], "--lr-decay-style WSD needs --lr-wsd-decay-iters"),
    (["--train-iters", "10", "--lr-wsd-decay-iters", "3"], "--lr-wsd-decay-iters/--lr-wsd-decay-samples need"),
    (["--train-iters", "10", "--decoupled-min-lr", "1e-5"], "--decoupled-min-lr needs --decoupled-lr"),
    (["--train-iters", "10", "--grad-reduce-in-bf16"], "--grad-reduce-in-bf16 needs --bf16"),
    (["--train-iters", "10", "--kv-channels", "32"], "--kv-channels 32: only hidden size / attention heads (16)"),
    (["--train-iters", "10", "--finetune"], "--finetune starts from --load's weights"),
    (["--train-iters", "10", "--fp8-param-gather"], "--fp8-param-gather needs --fp8-format"),
    (["--train-iters", "10", "--fp8-format", "hybrid", "--fp8-param-gather"],
     "--fp8-param-gather needs --use-distributed-optimizer"),
    (["--train-iters", "10", "--fp8-format", "e4m3", "--first-last-layers-bf16"],
     "--first-last-layers-bf16 needs --fp8-recipe tensorwise, mxfp8 or blockwise"),
    (["--train-iters", "10", "--fp8-format", "e4m3", "--fp8-recipe", "tensorwise", "--first-last-layers-bf16",
      "--num-layers-at-end-in-bf16", "3"], "--num-layers-at-end-in-bf16 3: at most the 2 layers of a pipeline stage"),
    (["--train-iters", "10", "--fp8-format", "hybrid", "--deepspeed"], "--fp8-format hybrid with --deepspeed"),
])
def test_inconsistent_megatron_lm_flags_are_one_line_errors(corpus, flags, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _config(corpus, *flags)


def test_the_paper_recipe_is_opt_in_and_explicit_flags_win():
    megatron = parse_args([], required=()).optim
    paper = parse_args(["--recipe", "paper", "--lr-warmup-iters", "10"], required=()).optim
    assert (megatron.lr, megatron.lr_decay_style, megatron.lr_warmup_iters, megatron.weight_decay,
            megatron.adam_beta2, megatron.min_lr) == (None, "linear", 0, 0.01, 0.999, 0.0)
    assert (paper.lr, paper.lr_decay_style, paper.lr_warmup_iters, paper.weight_decay, paper.adam_beta1,
            paper.adam_beta2, paper.min_lr, paper.clip_grad) == (3e-4, "cosine", 10, 0.1, 0.9, 0.95, 3e-5, 1.0)


def test_decoupled_lr_is_the_embedding_and_output_layer_s(megatron_process, corpus):
    trainer = Trainer(_config(corpus, "--train-iters", "4", "--decoupled-lr", "5e-3", "--decoupled-min-lr", "5e-4"))
    groups = trainer.optimizer.param_groups
    embedding = {id(p) for model in trainer.models for name, p in model.named_parameters()
                 if "embedding" in name or "output_layer" in name}
    assert embedding
    for group in groups:
        in_embedding = {id(p) for p in group["params"]} & embedding
        assert bool(in_embedding) == (group["max_lr"] == 5e-3), group["max_lr"]
        assert group["min_lr"] == (5e-4 if in_embedding else 1e-4)


def _adam_moments(trainer) -> bool:
    """Whether the optimizer holds Adam moments that are not all zero."""
    inners = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    return any(t.any() for inner in inners for state in inner.optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)


@pytest.mark.parametrize("ckpt_format", ["torch", "torch_dist"])
def test_no_load_optim_and_no_load_rng_resume_the_weights_only(megatron_process, corpus, tmp_path, ckpt_format):
    out = tmp_path / "run"
    flags = phase_flags(corpus, out, 4, ["--save", str(out / "ckpt"), "--ckpt-format", ckpt_format], steps=2)
    run([PYTHON, "pretrain_patch_gpt.py", *flags])
    resumed = Trainer(parse_args([*flags, "--load", str(out / "ckpt"), "--train-iters", "4"]).resolve(1))
    resumed.load()
    fresh = Trainer(parse_args([*flags, "--load", str(out / "ckpt"), "--train-iters", "4", "--no-load-optim",
                                "--no-load-rng"]).resolve(1))
    torch.manual_seed(7)  # the RNG stream --no-load-rng keeps
    stream = torch.get_rng_state()
    fresh.load()
    assert fresh.iteration == resumed.iteration == 2
    for a, b in zip(fresh.models[0].state_dict().values(), resumed.models[0].state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    assert fresh.scheduler.num_steps == 0 and resumed.scheduler.num_steps == 2
    assert not _adam_moments(fresh) and _adam_moments(resumed)
    assert torch.equal(torch.get_rng_state(), stream)


def test_finetune_starts_from_load_s_weights_at_iteration_0(megatron_process, saved, tmp_path):
    flags, ckpt = saved
    cfg = parse_args([*flags, "--load", ckpt, "--finetune", "--save", str(tmp_path / "ft")]).resolve(1)
    assert (cfg.pretrained_checkpoint, cfg.load) == (ckpt, str(tmp_path / "ft"))  # a restart resumes the finetune
    trainer = Trainer(cfg)
    trainer.load()
    assert trainer.iteration == 0 and trainer.scheduler.num_steps == 0


def test_data_args_path_is_the_data_path_read_from_a_file(corpus, tmp_path):
    blend = ["0.3", corpus["aligned4"], "0.7", corpus["plain"]]
    args = tmp_path / "data_args.txt"
    args.write_text(f"  {blend[0]} {blend[1]}\n{blend[2]}\t{blend[3]}\n")
    argv = ["--model-preset", "tiny", "--seq-length", "32", "--micro-batch-size", "8", "--lr", "1e-3",
            "--tokenizer-model", corpus["tokenizer"], "--train-iters", "2"]
    cfg = parse_args([*argv, "--data-args-path", str(args)]).resolve(world_size=1)
    assert cfg.data.data_path == blend == parse_args([*argv, "--data-path", *blend]).resolve(1).data.data_path
    (tmp_path / "empty.txt").write_text("\n")
    for flags, message in ((["--data-args-path", str(tmp_path / "missing.txt")], "missing.txt: No such file"),
                           (["--data-args-path", str(tmp_path / "empty.txt")], "empty.txt: the file is empty"),
                           (["--data-args-path", str(args), "--data-path", corpus["plain"]],
                            "--data-path and --data-args-path: give one")):
        with pytest.raises(ConfigError, match=message):
            parse_args([*argv, *flags]).resolve(world_size=1)


def test_mock_data_trains_without_a_dataset(corpus, tmp_path):
    """--mock-data (megatron-core's synthetic documents) runs a patch-level phase end to end with no --data-path;
    with one, it is refused in one line."""
    flags = [*phase_flags(corpus, tmp_path, 4, steps=2), "--mock-data"]
    flags.pop(flags.index("--data-path") + 1)
    flags.remove("--data-path")
    trained = run([PYTHON, "pretrain_patch_gpt.py", *flags, "--log-json", str(tmp_path / "log.jsonl")])
    losses = [r["loss"] for r in json_log.steps(tmp_path / "log.jsonl").values()]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert "unigram entropy" not in trained.stdout  # no frequencies to bound
    both = run([PYTHON, "pretrain_patch_gpt.py", *phase_flags(corpus, tmp_path / "x", 4), "--mock-data"], check=False)
    assert both.returncode == 2 and both.stderr.strip() == "pretrain_patch_gpt: error: --mock-data and --data-path: " \
                                                           "give one"


def test_per_split_data_paths_read_each_split_from_its_own_blend(corpus, tmp_path):
    """--train-data-path trains exactly as --data-path with --split 1,0,0 does (the same samples) and validates on
    --valid-data-path; --per-split-data-args-path is the same three blends from a JSON file, lists or strings."""
    def trained(out, *data):
        flags = [*phase_flags(corpus, out, 4, steps=2), *data, "--eval-interval", "1", "--log-json", str(out / "log")]
        at = flags.index("--data-path")
        del flags[at:at + 2]
        run([PYTHON, "pretrain_patch_gpt.py", *flags])
        return [r["loss"] for r in json_log.steps(out / "log").values()], json_log.last_summary(out / "log")

    aligned, blend = corpus["aligned4"], ["0.6", corpus["aligned4"], "0.4", corpus["aligned4"]]
    per_split = trained(tmp_path / "a", "--train-data-path", aligned, "--valid-data-path", *blend)
    one_blend = trained(tmp_path / "b", "--data-path", aligned, "--split", "1,0,0")
    assert per_split[0] == one_blend[0] and len(per_split[0]) == 2
    assert math.isfinite(per_split[1]["valid_loss"]) and one_blend[1]["valid_loss"] is None  # 1,0,0: no validation

    argv = ["--model-preset", "tiny", "--seq-length", "32", "--micro-batch-size", "8", "--lr", "1e-3",
            "--tokenizer-model", corpus["tokenizer"], "--train-iters", "2"]
    given = parse_args([*argv, "--train-data-path", aligned, "--valid-data-path", *blend]).resolve(1).data
    for valid in (blend, " ".join(blend)):
        (tmp_path / "splits.json").write_text(json.dumps({"train": [aligned], "valid": valid, "test": []}))
        read = parse_args([*argv, "--per-split-data-args-path", str(tmp_path / "splits.json")]).resolve(1).data
        assert (read.train_data_path, read.valid_data_path, read.test_data_path) == ([aligned], blend, [])
        assert read.blends() == given.blends()
    (tmp_path / "bad.json").write_text('{"train": ["x"], "valid": []}')
    for flags, message in (
            (["--train-data-path", aligned, "--data-path", aligned],
             "--data-path and --train/valid/test-data-path: give one"),
            (["--train-data-path", aligned, "--split", "90,10,0"], "--split 90,10,0 and --train-data-path: give one"),
            (["--valid-data-path", aligned], "--train-data-path is required with --valid-data-path"),
            (["--train-data-path", aligned, "--test-data-path", "0.5", aligned, "x"],
             "--test-data-path: weighted blends need `weight prefix` pairs"),
            (["--train-data-path", aligned, "--valid-data-path", str(tmp_path / "missing")],
             f"--valid-data-path: {tmp_path / 'missing'}.bin does not exist"),
            (["--per-split-data-args-path", str(tmp_path / "bad.json")], "bad.json: need a JSON object with keys "
                                                                         "train, valid, test"),
            (["--per-split-data-args-path", str(tmp_path / "splits.json"), "--train-data-path", aligned],
             "--train/valid/test-data-path and --per-split-data-args-path: give one")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_args([*argv, *flags]).resolve(world_size=1)


def test_fp8_flags_reach_megatron_core_s_transformer_config(corpus):
    """The fp8 flags of Megatron-LM's LLaMA-3 fp8 script (and the others) are TransformerConfig's fields, as Megatron-LM
    passes them; without Transformer Engine, --fp8-format is refused in one line. Megatron-LM's fp8 variants not wired
    here are refused at parsing, with the rest."""
    fp8 = ["--bf16", "--fp8-format", "hybrid", "--fp8-recipe", "tensorwise", "--fp8-amax-history-len", "1024",
           "--fp8-amax-compute-algo", "max", "--fp8-margin", "0", "--disable-fp8-wgrad", "--fp8-param-gather",
           "--first-last-layers-bf16", "--num-layers-at-start-in-bf16", "2", "--num-layers-at-end-in-bf16", "0"]
    argv = ["--model-preset", "tiny", "--seq-length", "32", "--micro-batch-size", "8", "--lr", "1e-3",
            "--data-path", corpus["aligned4"], "--tokenizer-model", corpus["tokenizer"], "--train-iters", "2",
            "--use-distributed-optimizer"]
    cfg = parse_args([*argv, *fp8])
    config = transformer_config(cfg.model, cfg.parallel, cfg.bf16, cfg.fp16, cfg.fp8)
    assert (config.fp8, config.fp8_recipe, config.fp8_amax_history_len, config.fp8_amax_compute_algo,
            config.fp8_margin, config.fp8_wgrad, config.fp8_param, config.first_last_layers_bf16,
            config.num_layers_at_start_in_bf16, config.num_layers_at_end_in_bf16) == (
        "hybrid", "tensorwise", 1024, "max", 0, False, True, True, 2, 0)
    plain = parse_args(argv)
    config = transformer_config(plain.model, plain.parallel, fp8=plain.fp8)
    assert (config.fp8, config.fp8_param, config.fp8_wgrad) == (None, False, True)
    if importlib.util.find_spec("transformer_engine") is None:
        with pytest.raises(ConfigError, match=r"^--fp8-format hybrid needs Transformer Engine's fp8 GEMMs "
                                              r"\(--transformer-impl transformer_engine, GPU only\)"):
            cfg.resolve(world_size=1)
    refused = run([PYTHON, "pretrain_patch_gpt.py", *argv, "--fp8-recipe", "custom", "--fp4-format", "e2m1",
                   "--fp8-interval", "1"], check=False)
    assert refused.returncode == 2 and refused.stderr.startswith(
        "pretrain_patch_gpt: error: 2 Megatron-LM flags not supported here: --fp8-recipe custom: a custom quantizer"), \
        refused.stderr
    assert "--fp4-format: fp4 (NVFP4, Blackwell) is not supported here" in refused.stderr
    assert "--fp8-interval" not in refused.stderr  # accepted: Transformer Engine has no interval any more
