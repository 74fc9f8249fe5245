"""The DeepSpeed config merge (megatron_patch/config/deepspeed.py): our flags fill the JSON, conflicts and
unsupported combinations are one-line ConfigErrors naming the key and the flag, all before any process group starts
(plan.phases_to_run, what pretrain_patch_gpt.py runs first). No process group, no DeepSpeed import."""

import glob
import json
import os

import pytest

from helpers import ROOT, phase_flags
from megatron_patch.config.flags import parse_args
from megatron_patch.config.plan import phases_to_run
from megatron_patch.config.schema import ConfigError
from megatron_patch.training.deepspeed_engine import for_this_device


def resolved(corpus, tmp_path, extra, world_size=2):
    (cfg,), _ = phases_to_run(parse_args(phase_flags(corpus, tmp_path, 4, extra)), world_size)
    return cfg.deepspeed.resolved


def config_file(tmp_path, content) -> str:
    path = tmp_path / "ds.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_flags_fill_auto_and_missing_values(corpus, tmp_path):
    ds = resolved(corpus, tmp_path, ["--deepspeed", "--deepspeed_config", f"{ROOT}/deepspeed_configs/zero3_fp32.json",
                                     "--clip-grad", "0.5", "--weight-decay", "0.01"])
    # conftest's runs: 8 samples per step, micro-batches of 2, DP=2 -> 2 accumulation steps.
    batch = (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"])
    assert batch == (8, 2, 2)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                           "weight_decay": 0.01}}
    # On this CPU machine the engine runs torch's AdamW (no JIT-compiled CPU Adam); the resolved config is unchanged.
    assert for_this_device(ds)["optimizer"]["params"]["torch_adam"] is True
    assert "torch_adam" not in ds["optimizer"]["params"]
    assert ds["zero_optimization"]["stage"] == 3


def test_zero_stage_flag_overrides_the_file(corpus, tmp_path):
    ds = resolved(corpus, tmp_path, ["--deepspeed", "--deepspeed_config", config_file(tmp_path, {}),
                                     "--zero-stage", "2"])
    assert ds["zero_optimization"] == {"stage": 2} and ds["train_batch_size"] == 8


@pytest.mark.parametrize("path", sorted(glob.glob(f"{ROOT}/deepspeed_configs/*.json")), ids=os.path.basename)
def test_shipped_configs_resolve(corpus, tmp_path, path):
    bf16 = [] if path.endswith("_fp32.json") else ["--bf16"]
    ds = resolved(corpus, tmp_path, ["--deepspeed", "--deepspeed_config", path, *bf16])
    assert ds["bf16"]["enabled"] == bool(bf16)


@pytest.mark.parametrize("content,extra,message", [
    ({"train_batch_size": 16}, [],
     '"train_batch_size" is 16 but --global-batch-size gives 8; write "auto" there'),
    ({"gradient_clipping": 0.5}, [], '"gradient_clipping" is 0.5 but --clip-grad gives 1.0'),
    ({"bf16": {"enabled": True}}, [], '"bf16.enabled" is true but --bf16 gives false'),
    ({"optimizer": {"params": {"betas": [0.9, 0.999]}}}, [],
     '"optimizer.params.betas" is [0.9, 0.999] but --adam-beta1/--adam-beta2 gives [0.9, 0.95]'),
    ({"scheduler": {"type": "WarmupLR"}}, [], 'remove "scheduler": the LR schedule is megatron\'s'),
    ({"fp16": {"enabled": True}}, [], "fp16 training is not supported here; use bf16 (--bf16)"),
    ({"zero_optimization": {"stage": 3}}, ["--pipeline-model-parallel-size", "2"],
     "ZeRO stage 3 with --pipeline-model-parallel-size 2: use ZeRO stage 1"),
    ({}, ["--pipeline-model-parallel-size", "2"], "ZeRO stage 0 with --pipeline-model-parallel-size 2"),
    ({"zero_optimization": {"stage": 1, "overlap_comm": True}}, ["--pipeline-model-parallel-size", "2"],
     '"zero_optimization.overlap_comm" must be false with --pipeline-model-parallel-size 2'),
    ({}, ["--tensor-model-parallel-size", "2", "--sequence-parallel"], "--sequence-parallel is not supported"),
    ('{"train_batch_size": 8,\n', [], "invalid JSON at line 2 column 1"),
    ([1], [], "expected a JSON object"),
], ids=["batch", "clip", "bf16", "betas", "scheduler", "fp16", "zero3_pp", "zero0_pp", "overlap_pp", "sp", "json",
        "not_object"])
def test_bad_deepspeed_config_is_one_clear_error(corpus, tmp_path, content, extra, message):
    path = config_file(tmp_path, content)
    with pytest.raises(ConfigError) as error:
        resolved(corpus, tmp_path, ["--deepspeed", "--deepspeed_config", path, *extra])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_deepspeed_flags_need_deepspeed(corpus, tmp_path):
    with pytest.raises(ConfigError, match="--deepspeed_config and --zero-stage need --deepspeed"):
        resolved(corpus, tmp_path, ["--zero-stage", "2"])
    with pytest.raises(ConfigError, match="--deepspeed needs --deepspeed_config FILE"):
        resolved(corpus, tmp_path, ["--deepspeed"])
