"""The DeepSpeed JSON a run hands to `deepspeed.initialize`, from `--deepspeed_config FILE` and our flags. No torch,
no DeepSpeed import: every mistake is a one-line ConfigError before any process group starts.

One source of truth: our flags fill the JSON's "auto" (or missing) batch sizes, clipping, precision and AdamW
parameters; an explicit value that disagrees names the key and the flag. The LR schedule is megatron's, so a
"scheduler" is refused; combinations DeepSpeed does not support with megatron-core's pipeline are refused too.
"""

from __future__ import annotations

import glob
import json
import os

from megatron_patch.checkpoint import layout
from megatron_patch.config.schema import ConfigError, TrainingConfig


class _Settler:
    """Fills a JSON object's "auto"/missing values from flags; a conflicting explicit value is a ConfigError."""

    def __init__(self, where: str):
        self.where = where

    def section(self, node: dict, name: str) -> dict:
        value = node.setdefault(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f'{self.where}: "{name}" must be an object')
        return value

    def settle(self, node: dict, key: str, flag: str, value, dotted: str = "") -> None:
        current = node.get(key, "auto")
        if current == "auto":
            node[key] = value
        elif current != value:
            raise ConfigError(
                f'{self.where}: "{dotted or key}" is {json.dumps(current)} but {flag} gives {json.dumps(value)}; '
                f'write "auto" there (the command line is the single source of truth)'
            )


def resolve_deepspeed_config(cfg: TrainingConfig, data_parallel: int) -> dict:
    """The JSON of --deepspeed_config with every setting our flags also own filled from them; raises ConfigError
    (one line naming the key and the flag) when the file says otherwise or asks for an unsupported combination."""
    ds = _read(cfg.deepspeed.config)
    settler = _Settler(f"--deepspeed_config {cfg.deepspeed.config}")
    _settle_batch_and_precision(ds, settler, cfg, data_parallel)
    _settle_optimizer(ds, settler, cfg)
    _settle_zero(ds, settler, cfg)
    _check_resume(cfg)
    return ds


def _read(path) -> dict:
    if not path:
        raise ConfigError("--deepspeed needs --deepspeed_config FILE (examples in deepspeed_configs/)")
    where = f"--deepspeed_config {path}"
    try:
        with open(path) as f:
            ds = json.load(f)
    except OSError as e:
        raise ConfigError(f"{where}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    return ds


def _settle_batch_and_precision(ds: dict, s: _Settler, cfg: TrainingConfig, data_parallel: int) -> None:
    s.settle(ds, "train_batch_size", "--global-batch-size", cfg.global_batch_size)
    s.settle(ds, "train_micro_batch_size_per_gpu", "--micro-batch-size", cfg.micro_batch_size)
    s.settle(ds, "gradient_accumulation_steps", "--global-batch-size / (--micro-batch-size x data-parallel size)",
             cfg.global_batch_size // (cfg.micro_batch_size * data_parallel))
    s.settle(ds, "gradient_clipping", "--clip-grad", cfg.optim.clip_grad)
    s.settle(s.section(ds, "bf16"), "enabled", "--bf16", cfg.bf16, "bf16.enabled")
    if s.section(ds, "fp16").get("enabled", False) not in (False, "auto"):
        raise ConfigError(f'{s.where}: "fp16.enabled": fp16 training is not supported here; use bf16 (--bf16)')
    ds["fp16"]["enabled"] = False


def _settle_optimizer(ds: dict, s: _Settler, cfg: TrainingConfig) -> None:
    if "scheduler" in ds:
        raise ConfigError(f'{s.where}: remove "scheduler": the LR schedule is megatron\'s (--lr, --min-lr, '
                          f'--lr-warmup-iters, --lr-decay-iters, --lr-decay-style)')
    o = cfg.optim
    optimizer = s.section(ds, "optimizer")
    s.settle(optimizer, "type", "megatron's Adam (decoupled weight decay)", "AdamW", "optimizer.type")
    params = optimizer.setdefault("params", {})
    s.settle(params, "lr", "--lr", o.lr, "optimizer.params.lr")
    s.settle(params, "betas", "--adam-beta1/--adam-beta2", [o.adam_beta1, o.adam_beta2], "optimizer.params.betas")
    s.settle(params, "eps", "--adam-eps", o.adam_eps, "optimizer.params.eps")
    s.settle(params, "weight_decay", "--weight-decay", o.weight_decay, "optimizer.params.weight_decay")


def _settle_zero(ds: dict, s: _Settler, cfg: TrainingConfig) -> None:
    zero = s.section(ds, "zero_optimization")
    if cfg.deepspeed.zero_stage is not None:
        zero["stage"] = cfg.deepspeed.zero_stage
    stage = zero.setdefault("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f'{s.where}: "zero_optimization.stage" must be 0, 1, 2 or 3, got {json.dumps(stage)}')
    pp = cfg.parallel.pipeline_model_parallel_size
    if pp > 1 and stage != 1:
        reason = ("DeepSpeed partitions gradients/parameters only without pipeline parallelism" if stage > 1 else
                  "DeepSpeed's stage-0 gradient clipping would count the replicated weights of the first pipeline "
                  "stage only")
        raise ConfigError(f"ZeRO stage {stage} with --pipeline-model-parallel-size {pp}: use ZeRO stage 1 "
                          f"(--zero-stage 1) with pipeline parallelism; {reason}")
    if pp > 1 and zero.get("overlap_comm", False):
        raise ConfigError(f'{s.where}: "zero_optimization.overlap_comm" must be false with '
                          f'--pipeline-model-parallel-size {pp}: the pipeline schedule accumulates every micro-batch '
                          f'first, the engine reduces once')
    if cfg.parallel.sequence_parallel:
        raise ConfigError("--sequence-parallel is not supported with --deepspeed (DeepSpeed does not all-reduce "
                          "the sequence-parallel norm gradients over the tensor-parallel group)")


def _check_resume(cfg: TrainingConfig) -> None:
    iteration = layout.latest_iteration(cfg.load)
    if iteration is not None and not is_deepspeed_checkpoint(layout.iteration_dir(cfg.load, iteration)):
        raise ConfigError(f"--load {cfg.load}: {layout.iteration_dir(cfg.load, iteration)} was not written with "
                          f"--deepspeed; resume it without --deepspeed, or start from its weights with "
                          f"--pretrained-checkpoint")


def is_deepspeed_checkpoint(iteration_dir: str) -> bool:
    return bool(glob.glob(os.path.join(iteration_dir, "*model_states.pt")))
