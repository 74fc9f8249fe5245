"""Configuration: dataclasses for model / parallel layout / data / optimisation / phase, and the Megatron-style
command line that fills them. A training phase is one `TrainingConfig`; phase 1 and phase 2 differ only in
values (patch size, sequence length, batch, where weights come from), never in code."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional, Tuple


TRACKER = "latest_checkpointed_iteration.txt"  # Megatron-LM's name for the last complete checkpoint


class ConfigError(ValueError):
    """A user-facing configuration mistake: reported as one line, before any work starts."""


@dataclass
class ModelConfig:
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    ffn_hidden_size: Optional[int] = None  # Megatron's default: 4 * hidden (SwiGLU users pass ~8/3 * hidden)
    max_position_embeddings: Optional[int] = None  # learned positions only; default seq_length // patch_size
    # Megatron's defaults are GPT-2 style; the LLaMA recipe sets RMSNorm, --swiglu, rope, no bias, untied.
    normalization: str = "LayerNorm"
    swiglu: bool = False
    position_embedding_type: str = "learned_absolute"
    rotary_base: int = 10000
    add_bias_linear: bool = True
    untie_embeddings_and_output_weights: bool = False
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    norm_epsilon: float = 1e-5


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    num_layers_per_virtual_pipeline_stage: Optional[int] = None  # interleaved 1F1B when set
    sequence_parallel: bool = False  # split norms/dropout activations along the sequence over the TP group
    virtual_pipeline_model_parallel_size: Optional[int] = None  # derived: model chunks per pipeline rank


@dataclass
class DataConfig:
    data_path: List[str] = field(default_factory=list)  # Megatron blend syntax: [w1] prefix1 [w2 prefix2 ...]
    split: str = "969,30,1"
    tokenizer_model: Optional[str] = None
    data_cache_path: Optional[str] = None
    num_workers: int = 0
    # [start, end) fractions of the training split's tokens this phase reads (a plan gives phase 1 [0, lambda)
    # and phase 2 [lambda, 1), so phase 2 continues on data phase 1 has not seen).
    train_data_range: Tuple[float, float] = (0.0, 1.0)


@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_decay_style: str = "cosine"
    lr_warmup_iters: int = 2000
    lr_decay_iters: Optional[int] = None  # default: train_iters
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class PlanConfig:
    """A two-phase plan (megatron_patch/plan.py) instead of a single phase: with `patch_fraction` set, the
    TrainingConfig describes the token-level run (seq length, global batch, total tokens) that the plan splits."""

    patch_fraction: Optional[float] = None  # lambda: the fraction of the token budget trained at patch level
    phase: str = "both"  # which phases this command runs: "1", "2" or "both" (job chaining runs one at a time)


@dataclass
class DeepSpeedOptions:
    enabled: bool = False  # --deepspeed: data parallelism and ZeRO through a DeepSpeed engine
    config: Optional[str] = None  # --deepspeed_config FILE (JSON); our flags fill its "auto"/missing values
    zero_stage: Optional[int] = None  # --zero-stage: overrides the file's zero_optimization.stage
    resolved: Optional[dict] = None  # derived: the config handed to deepspeed.initialize


@dataclass
class TrainingConfig:
    """One training phase."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    deepspeed: DeepSpeedOptions = field(default_factory=DeepSpeedOptions)
    patch_size: int = 1  # K: tokens per patch; 1 = ordinary token-level training
    seq_length: int = 1024  # tokens read per sample (K * T); the transformer runs on seq_length // K positions
    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None  # default: micro_batch_size * data-parallel size
    train_iters: Optional[int] = None
    train_tokens: Optional[int] = None  # alternative to train_iters: tokens read in this phase
    seed: int = 1234
    bf16: bool = False
    log_interval: int = 10
    eval_interval: int = 1000
    eval_iters: int = 10
    save: Optional[str] = None
    save_interval: Optional[int] = None
    load: Optional[str] = None  # resume from here if it holds a checkpoint
    pretrained_checkpoint: Optional[str] = None  # weights-only start (phase 2 from phase 1) when nothing to resume
    log_json: Optional[str] = None  # append one JSON line per logged step
    # Megatron-LM's early exits; the loop then saves (with --save) and returns normally (exit code 0).
    exit_signal_handler: bool = False  # SIGTERM / SIGUSR1 (Slurm's warning before a time limit)
    exit_interval: Optional[int] = None  # stop after an iteration divisible by this
    exit_duration_in_mins: Optional[float] = None  # stop after this much wall time

    @property
    def num_patches(self) -> int:
        return self.seq_length // self.patch_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length

    def resolve(self, world_size: int) -> "TrainingConfig":
        """Derive defaults that depend on the launch and check everything; raises ConfigError."""
        m, p = self.model, self.parallel
        if self.patch_size < 1:
            raise ConfigError(f"--patch-size must be >= 1, got {self.patch_size}")
        if self.seq_length < 1 or self.seq_length % self.patch_size:
            raise ConfigError(
                f"--seq-length {self.seq_length} must be a positive multiple of --patch-size {self.patch_size}"
            )
        if m.hidden_size % m.num_attention_heads:
            raise ConfigError(
                f"--hidden-size {m.hidden_size} is not divisible by --num-attention-heads {m.num_attention_heads}"
            )
        if m.num_layers % p.pipeline_model_parallel_size:
            raise ConfigError(
                f"--num-layers {m.num_layers} is not divisible by --pipeline-model-parallel-size "
                f"{p.pipeline_model_parallel_size}"
            )
        if p.num_layers_per_virtual_pipeline_stage is not None:
            per_stage = m.num_layers // p.pipeline_model_parallel_size
            if p.pipeline_model_parallel_size < 2 or per_stage % p.num_layers_per_virtual_pipeline_stage:
                raise ConfigError(
                    f"--num-layers-per-virtual-pipeline-stage {p.num_layers_per_virtual_pipeline_stage} needs "
                    f"--pipeline-model-parallel-size > 1 and must divide the {per_stage} layers of each stage"
                )
            p.virtual_pipeline_model_parallel_size = per_stage // p.num_layers_per_virtual_pipeline_stage
        model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
        if world_size % model_parallel:
            raise ConfigError(
                f"world size {world_size} is not divisible by tensor x pipeline parallel size {model_parallel}"
            )
        if m.num_attention_heads % p.tensor_model_parallel_size:
            raise ConfigError(
                f"--num-attention-heads {m.num_attention_heads} is not divisible by "
                f"--tensor-model-parallel-size {p.tensor_model_parallel_size}"
            )
        if p.sequence_parallel and (p.tensor_model_parallel_size == 1 or self.num_patches % p.tensor_model_parallel_size):
            raise ConfigError(
                f"--sequence-parallel needs --tensor-model-parallel-size > 1 dividing the {self.num_patches} "
                f"positions per sample (seq length / patch size)"
            )
        data_parallel = world_size // model_parallel
        if self.global_batch_size is None:
            self.global_batch_size = self.micro_batch_size * data_parallel
        if self.global_batch_size % (self.micro_batch_size * data_parallel):
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} is not divisible by --micro-batch-size "
                f"{self.micro_batch_size} x data-parallel size {data_parallel}"
            )
        if (self.train_iters is None) == (self.train_tokens is None):
            raise ConfigError("give exactly one of --train-iters and --train-tokens")
        if self.train_iters is None:
            self.train_iters = -(-self.train_tokens // self.tokens_per_step)
        if self.train_iters < 1:
            raise ConfigError(f"--train-iters must be >= 1, got {self.train_iters}")
        if m.max_position_embeddings is None:
            m.max_position_embeddings = self.num_patches
        if m.position_embedding_type == "learned_absolute" and m.max_position_embeddings < self.num_patches:
            raise ConfigError(
                f"--max-position-embeddings {m.max_position_embeddings} < {self.num_patches} positions "
                f"(seq length {self.seq_length} / patch size {self.patch_size})"
            )
        if self.optim.lr_decay_iters is None:
            self.optim.lr_decay_iters = self.train_iters
        if self.optim.lr_warmup_iters >= self.optim.lr_decay_iters:
            raise ConfigError(
                f"--lr-warmup-iters {self.optim.lr_warmup_iters} must be smaller than --lr-decay-iters "
                f"{self.optim.lr_decay_iters} (default: the phase's iterations)"
            )
        start, end = self.data.train_data_range
        if not 0.0 <= start < end <= 1.0:
            raise ConfigError(f"--train-data-range {start} {end}: need 0 <= start < end <= 1")
        if not self.data.data_path:
            raise ConfigError("--data-path is required")
        for prefix in _blend_prefixes(self.data.data_path):
            for suffix in (".bin", ".idx"):
                if not os.path.isfile(prefix + suffix):
                    raise ConfigError(f"--data-path: {prefix}{suffix} does not exist")
        if self.data.tokenizer_model is None or not os.path.isfile(self.data.tokenizer_model):
            raise ConfigError(f"--tokenizer-model: file not found: {self.data.tokenizer_model}")
        if self.pretrained_checkpoint and not os.path.isfile(os.path.join(self.pretrained_checkpoint, TRACKER)):
            raise ConfigError(f"--pretrained-checkpoint {self.pretrained_checkpoint}: no {TRACKER} there")
        if self.save_interval is not None and self.save is None:
            raise ConfigError("--save-interval needs --save")
        if self.deepspeed.enabled:
            from megatron_patch.engine import deepspeed_config  # imports DeepSpeed only when asked for

            self.deepspeed.resolved = deepspeed_config(self, data_parallel)
        elif self.deepspeed.config or self.deepspeed.zero_stage is not None:
            raise ConfigError("--deepspeed_config and --zero-stage need --deepspeed")
        return self


def _blend_prefixes(data_path: List[str]) -> List[str]:
    """Megatron's blend syntax: either `prefix [prefix ...]` or `weight prefix [weight prefix ...]`."""
    try:
        float(data_path[0])
    except ValueError:
        return list(data_path)
    if len(data_path) % 2:
        raise ConfigError("--data-path: weighted blends need `weight prefix` pairs")
    return list(data_path[1::2])


def parse_blend(data_path: List[str]):
    """(prefixes, weights or None) in megatron-core's `blend` format."""
    prefixes = _blend_prefixes(data_path)
    if prefixes == list(data_path):
        return prefixes, None
    return prefixes, [float(w) for w in data_path[0::2]]


class _OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


# (flag, dataclass path, argparse kwargs): one table drives parsing and keeps Megatron-LM's flag names.
_FLAGS = [
    ("--num-layers", "model.num_layers", dict(type=int)),
    ("--hidden-size", "model.hidden_size", dict(type=int)),
    ("--num-attention-heads", "model.num_attention_heads", dict(type=int)),
    ("--ffn-hidden-size", "model.ffn_hidden_size", dict(type=int)),
    ("--max-position-embeddings", "model.max_position_embeddings", dict(type=int)),
    ("--normalization", "model.normalization", dict(choices=["LayerNorm", "RMSNorm"])),
    ("--swiglu", "model.swiglu", dict(action="store_true")),
    ("--position-embedding-type", "model.position_embedding_type", dict(choices=["learned_absolute", "rope"])),
    ("--rotary-base", "model.rotary_base", dict(type=int)),
    ("--disable-bias-linear", "model.add_bias_linear", dict(action="store_false")),
    ("--untie-embeddings-and-output-weights", "model.untie_embeddings_and_output_weights",
     dict(action="store_true")),
    ("--hidden-dropout", "model.hidden_dropout", dict(type=float)),
    ("--attention-dropout", "model.attention_dropout", dict(type=float)),
    ("--init-method-std", "model.init_method_std", dict(type=float)),
    ("--norm-epsilon", "model.norm_epsilon", dict(type=float)),
    ("--tensor-model-parallel-size", "parallel.tensor_model_parallel_size", dict(type=int)),
    ("--pipeline-model-parallel-size", "parallel.pipeline_model_parallel_size", dict(type=int)),
    ("--num-layers-per-virtual-pipeline-stage", "parallel.num_layers_per_virtual_pipeline_stage", dict(type=int)),
    ("--sequence-parallel", "parallel.sequence_parallel", dict(action="store_true")),
    ("--data-path", "data.data_path", dict(nargs="+")),
    ("--split", "data.split", dict()),
    ("--tokenizer-model", "data.tokenizer_model", dict()),
    ("--data-cache-path", "data.data_cache_path", dict()),
    ("--num-workers", "data.num_workers", dict(type=int)),
    ("--train-data-range", "data.train_data_range", dict(type=float, nargs=2, metavar=("START", "END"))),
    ("--lr", "optim.lr", dict(type=float)),
    ("--min-lr", "optim.min_lr", dict(type=float)),
    ("--lr-decay-style", "optim.lr_decay_style", dict(choices=["cosine", "linear", "constant"])),
    ("--lr-warmup-iters", "optim.lr_warmup_iters", dict(type=int)),
    ("--lr-decay-iters", "optim.lr_decay_iters", dict(type=int)),
    ("--weight-decay", "optim.weight_decay", dict(type=float)),
    ("--adam-beta1", "optim.adam_beta1", dict(type=float)),
    ("--adam-beta2", "optim.adam_beta2", dict(type=float)),
    ("--adam-eps", "optim.adam_eps", dict(type=float)),
    ("--clip-grad", "optim.clip_grad", dict(type=float)),
    ("--patch-size", "patch_size", dict(type=int)),
    ("--seq-length", "seq_length", dict(type=int)),
    ("--micro-batch-size", "micro_batch_size", dict(type=int)),
    ("--global-batch-size", "global_batch_size", dict(type=int)),
    ("--train-iters", "train_iters", dict(type=int)),
    ("--train-tokens", "train_tokens", dict(type=int)),
    ("--seed", "seed", dict(type=int)),
    ("--bf16", "bf16", dict(action="store_true")),
    ("--log-interval", "log_interval", dict(type=int)),
    ("--eval-interval", "eval_interval", dict(type=int)),
    ("--eval-iters", "eval_iters", dict(type=int)),
    ("--save", "save", dict()),
    ("--save-interval", "save_interval", dict(type=int)),
    ("--load", "load", dict()),
    ("--pretrained-checkpoint", "pretrained_checkpoint", dict()),
    ("--log-json", "log_json", dict()),
    ("--exit-signal-handler", "exit_signal_handler", dict(action="store_true")),
    ("--exit-interval", "exit_interval", dict(type=int)),
    ("--exit-duration-in-mins", "exit_duration_in_mins", dict(type=float)),
    ("--patch-fraction", "plan.patch_fraction", dict(type=float)),
    ("--phase", "plan.phase", dict(choices=["1", "2", "both"])),
    ("--deepspeed", "deepspeed.enabled", dict(action="store_true")),  # DeepSpeed's own flag names
    ("--deepspeed_config", "deepspeed.config", dict()),
    ("--zero-stage", "deepspeed.zero_stage", dict(type=int, choices=[0, 1, 2, 3])),  # Megatron-DeepSpeed's
]


def flag_for(path: str) -> str:
    """The command-line flag of a config field (`model.hidden_size` -> `--hidden-size`)."""
    return next((flag for flag, field_path, _ in _FLAGS if field_path == path), path)


def _get(obj, path):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set(obj, path, value):
    *parents, leaf = path.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, leaf, value)


def build_parser(prog: str = "pretrain_patch_gpt") -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(prog=prog, description="Patch-level (then token-level) GPT pretraining.")
    defaults = TrainingConfig()
    for flag, path, kwargs in _FLAGS:
        kwargs = dict(kwargs)
        if kwargs.get("action") not in ("store_true", "store_false"):
            kwargs.setdefault("default", _get(defaults, path))
        parser.add_argument(flag, dest=path.replace(".", "__"), **kwargs)
    # Set by the deepspeed launcher; accepted so the same command line works under every launcher.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def parse_args(argv=None) -> TrainingConfig:
    args = build_parser().parse_args(argv)
    cfg = TrainingConfig()
    for _, path, _ in _FLAGS:
        _set(cfg, path, getattr(args, path.replace(".", "__")))
    return cfg


def to_dict(cfg: TrainingConfig) -> dict:
    return dataclasses.asdict(cfg)
