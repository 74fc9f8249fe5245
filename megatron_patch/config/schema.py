"""Configuration: dataclasses for model / parallel layout / data / optimisation / phase, and their validation.
A training phase is one `TrainingConfig`; phase 1 and phase 2 differ only in values (patch size, sequence length,
batch, where weights come from), never in code. The command line that fills them is `flags.py`. No torch here:
plans and checks run on login nodes.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from megatron_patch.checkpoint import layout
from megatron_patch.config.tokenizer import TokenizerError, TokenizerSpec
from megatron_patch.errors import MegatronPatchError


class ConfigError(MegatronPatchError, ValueError):
    """A user-facing configuration mistake: reported as one line, before any work starts."""


VOCAB_DIVISIBLE_BY = 128  # Megatron-LM's --make-vocab-size-divisible-by default
TRANSFORMER_IMPLS = ("local", "transformer_engine")
ATTENTION_BACKENDS = ("auto", "flash", "fused", "unfused", "local")  # Megatron-LM's --attention-backend
SDPA_BACKENDS = ("auto", "flash", "fused")  # with the local layers: torch's scaled_dot_product_attention
CKPT_FORMATS = ("torch_dist", "torch")  # Megatron-LM's --ckpt-format values we write and read
RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp")  # what megatron-core recomputes selectively in a dense GPT
MODEL_CLASSES = ("gpt", "hybrid")  # megatron-core's GPTModel, or its HybridModel (MambaModel before 0.18)
LOCAL_HYBRID_LAYERS = {"*": "attention", "-": "MLP"}  # what the local (torch) layers build of a hybrid pattern
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")  # megatron-core's scheduler's
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
SPLITS = ("train", "valid", "test")  # megatron-core's Split order
DEFAULT_SPLIT = "969,30,1"
LR_REQUIRED = "--lr is required (the peak learning rate), as in Megatron-LM; --recipe paper sets the paper's 3e-4"


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int) -> int:
    """Rows of the embedding and output layer: the vocabulary padded so every tensor-parallel rank gets a
    multiple of 128."""
    multiple = VOCAB_DIVISIBLE_BY * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


def iterations_for_tokens(tokens: int, tokens_per_step: int) -> int:
    """Whole optimizer steps that read at least `tokens` (the --train-tokens rule, everywhere)."""
    return -(-tokens // tokens_per_step)


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
    apply_layernorm_1p: bool = False  # norm weights zero-centred (Transformer Engine's norms only)
    kv_channels: Optional[int] = None  # per-head width; only hidden_size // num_attention_heads here
    # "local" | "transformer_engine"; None (Megatron-LM's default, resolved with a notice): Transformer Engine when
    # it imports, else the local (torch) layers, which run anywhere. A model built from an unresolved config
    # (library use) has the local layers.
    transformer_impl: Optional[str] = None
    # Megatron-LM's names. Local layers: auto/flash/fused -> attention.SDPAttention (torch's fused kernels),
    # unfused/local -> megatron-core's DotProductAttention. Transformer Engine: handed to megatron-core as is.
    attention_backend: str = "auto"
    group_query_attention: bool = False
    num_query_groups: Optional[int] = None  # with group_query_attention; default 1 (Megatron-LM's)
    # Activation recompute (megatron-core's TransformerConfig fields of the same names).
    recompute_granularity: Optional[str] = None  # "full" | "selective"
    recompute_method: Optional[str] = None  # full: "uniform" | "block"
    recompute_num_layers: Optional[int] = None  # full: layers per recompute unit (uniform) / recomputed (block)
    recompute_modules: Optional[List[str]] = None  # selective: default ["core_attn"] (megatron-core's)
    # "hybrid": megatron-core's HybridModel, its layers from hybrid_layer_pattern ("*" attention, "-" MLP, "M"
    # Mamba, ...; one symbol per layer, so the pattern sets num_layers). A pattern selects it.
    model_class: str = "gpt"
    hybrid_layer_pattern: Optional[str] = None

    @property
    def query_groups(self) -> int:
        """Key/value heads: num_query_groups with grouped-query attention (1 if not given), else one per head."""
        if not self.group_query_attention:
            return self.num_attention_heads
        return self.num_query_groups or 1

    @property
    def uses_sdpa(self) -> bool:
        """Whether the local layers' core attention is attention.SDPAttention (else megatron-core's unfused
        DotProductAttention)."""
        return self.transformer_impl != "transformer_engine" and self.attention_backend in SDPA_BACKENDS


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    num_layers_per_virtual_pipeline_stage: Optional[int] = None  # interleaved 1F1B when set
    sequence_parallel: bool = False  # split norms/dropout activations along the sequence over the TP group
    virtual_pipeline_model_parallel_size: Optional[int] = None  # derived: model chunks per pipeline rank
    # A collective waiting longer than this on a dead or stuck rank fails (Megatron-LM's default: 10 minutes).
    distributed_timeout_minutes: float = 10
    # megatron-core's distributed optimizer: fp32 master weights and Adam state sharded over data-parallel ranks
    # (gradients reduce-scattered, updated weights all-gathered).
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False  # reduce gradients bucket by bucket while the backward pass runs
    overlap_param_gather: bool = False  # all-gather the updated weights during the next forward pass
    grad_reduce_in_bf16: bool = False  # with bf16: data-parallel gradient reduction in bf16 (default fp32)


@dataclass
class DataConfig:
    data_path: List[str] = field(default_factory=list)  # Megatron blend syntax: [w1] prefix1 [w2 prefix2 ...]
    data_args_path: Optional[str] = None  # Megatron-LM's: a file holding data_path's values (read into it)
    # Instead of data_path and split: each split's own blend (Megatron-LM's --train/valid/test-data-path, or a JSON
    # file of them, --per-split-data-args-path, read into them). An empty one: that split has no data.
    train_data_path: List[str] = field(default_factory=list)
    valid_data_path: List[str] = field(default_factory=list)
    test_data_path: List[str] = field(default_factory=list)
    per_split_data_args_path: Optional[str] = None
    mock_data: bool = False  # megatron-core's synthetic documents instead of data_path (Megatron-LM's --mock-data)
    split: str = DEFAULT_SPLIT
    # The tokenizer (tokenizer.py): Megatron-LM's --tokenizer-type and the flags of each type.
    tokenizer_type: Optional[str] = None  # None: SentencePiece for a .model, HuggingFace for a .json / directory
    tokenizer_model: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    vocab_size: Optional[int] = None
    tokenizer_hf_include_special_tokens: bool = False
    data_cache_path: Optional[str] = None
    num_workers: int = 2
    # [start, end) fractions of the training split's tokens this phase reads (a plan gives phase 1 [0, lambda)
    # and phase 2 [lambda, 1), so phase 2 continues on data phase 1 has not seen).
    train_data_range: Tuple[float, float] = (0.0, 1.0)

    @property
    def per_split(self) -> bool:
        """Whether each split has its own blend (then data_path and split are not read)."""
        return any(getattr(self, f"{split}_data_path") for split in SPLITS)

    def blends(self) -> dict:
        """split name -> (flag, blend values) of the data a run reads: --data-path's for every split, or each
        split's own (empty: none)."""
        if self.per_split:
            return {split: (f"--{split}-data-path", getattr(self, f"{split}_data_path")) for split in SPLITS}
        return {split: ("--data-path", self.data_path) for split in SPLITS}

    def training_blend(self) -> tuple:
        """(prefixes, weights) of the training data."""
        flag, values = self.blends()["train"]
        return parse_blend(values, flag)

    def given_blends(self) -> Dict[str, List[str]]:
        """flag -> blend values of each distinct blend (--data-path once, not once per split)."""
        return dict(self.blends().values())

    def prefixes(self) -> List[str]:
        """Every dataset prefix the run reads, once each, in order."""
        return list(dict.fromkeys(prefix for flag, values in self.given_blends().items()
                                  for prefix in parse_blend(values, flag)[0]))

    def read_only(self, data_path: List[str]) -> None:
        """Read `data_path` (all splits, by --split) instead of the data configured."""
        self.data_path = list(data_path)
        for split in SPLITS:
            setattr(self, f"{split}_data_path", [])


FP8_FORMATS = ("e4m3", "hybrid")  # Megatron-LM's --fp8-format: e4m3 everywhere, or e5m2 for the gradients
FP8_RECIPES = ("tensorwise", "delayed", "mxfp8", "blockwise")  # Megatron-LM's, less `custom`


@dataclass
class Fp8Config:
    """Transformer Engine's fp8 GEMMs in the transformer layers (megatron-core's TransformerConfig fields; Megatron-LM's
    flags and defaults). The mean of K embeddings, the output layer and the loss stay in bf16/fp32: megatron-core
    runs only its TransformerBlock under fp8 autocast."""

    format: Optional[str] = None  # None: no fp8
    recipe: str = "delayed"
    margin: int = 0
    amax_history_len: int = 1
    amax_compute_algo: str = "most_recent"
    wgrad: bool = True  # the weight gradients' GEMMs in fp8 too
    param_gather: bool = False  # keep the weights in fp8 and all-gather them so (distributed optimizer)
    first_last_layers_bf16: bool = False
    num_layers_at_start_in_bf16: int = 1
    num_layers_at_end_in_bf16: int = 1


@dataclass
class OptimizerConfig:
    """Megatron-LM's defaults (its arguments.py); the paper's recipe is `--recipe paper` (presets.RECIPES). Schedule
    lengths are in iterations; the sample-based flags are converted (`TrainingConfig.schedule_in_iterations`), to
    fractional iterations where they fall between two, which gives Megatron-LM's sample-based curve exactly."""

    lr: Optional[float] = None  # required, as in Megatron-LM (--recipe paper: 3e-4)
    min_lr: float = 0.0
    lr_decay_style: str = "linear"
    lr_warmup_iters: float = 0
    lr_warmup_fraction: Optional[float] = None  # warmup = this fraction of the decay steps (of each phase)
    lr_decay_iters: Optional[float] = None  # default: train_iters
    lr_warmup_samples: int = 0  # sample-based schedule (with --train-samples)
    lr_decay_samples: Optional[int] = None
    lr_wsd_decay_style: str = "exponential"  # WSD: the shape of its final decay
    lr_wsd_decay_iters: Optional[float] = None  # WSD: iterations of the final decay (the rest stays at --lr)
    lr_wsd_decay_samples: Optional[int] = None
    decoupled_lr: Optional[float] = None  # peak LR of the input embedding and output layer (megatron-core's)
    decoupled_min_lr: Optional[float] = None
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    # --fp16's loss scaling (megatron-core's grad scaler): a static --loss-scale, else dynamic from
    # initial_loss_scale, halved after `hysteresis` overflowing steps (each skipped), doubled after
    # loss_scale_window clean ones, never below min_loss_scale.
    loss_scale: Optional[float] = None
    initial_loss_scale: float = 2.0**32
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000
    hysteresis: int = 2


@dataclass
class TrackingConfig:
    """Experiment tracking, Megatron-LM's flags. Only global rank 0 writes; neither backend is needed to train."""

    tensorboard_dir: Optional[str] = None  # TensorBoard event files
    wandb_project: Optional[str] = None  # Weights & Biases (offline with WANDB_MODE=offline)
    wandb_exp_name: Optional[str] = None
    wandb_save_dir: Optional[str] = None
    log_throughput: bool = False  # tokens/s, TFLOP/s per device and MFU in the log line too
    log_memory_to_tensorboard: bool = False
    log_validation_ppl_to_tensorboard: bool = False
    peak_tflops: Optional[float] = None  # per device, for MFU (default: the device table, or a CPU matmul probe)


@dataclass
class PlanConfig:
    """A two-phase plan (megatron_patch/config/plan.py) instead of a single phase: with `patch_fraction` set, the
    TrainingConfig describes the token-level run (seq length, global batch, total tokens) that the plan splits."""

    patch_fraction: Optional[float] = None  # lambda: the fraction of the token budget trained at patch level
    phase: str = "both"  # which phases this command runs: "1", "2" or "both" (job chaining runs one at a time)
    # Per-phase peak LR and warmup (None: --lr, --lr-warmup-iters). The paper uses one setting for both phases;
    # at small budgets phase 2's restarted warmup and peak LR matter (RESULTS.md).
    phase1_lr: Optional[float] = None
    phase2_lr: Optional[float] = None
    phase1_lr_warmup_iters: Optional[int] = None
    phase2_lr_warmup_iters: Optional[int] = None
    # Per-phase --decoupled-lr: phase 1 leaves the unigram plateau sooner with a higher LR for its input and output
    # layers (RESULTS.md, "Leaving the plateau"), which token-level training need not share.
    phase1_decoupled_lr: Optional[float] = None
    phase2_decoupled_lr: Optional[float] = None


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
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    patch_size: int = 1  # K: tokens per patch; 1 = ordinary token-level training
    seq_length: int = 1024  # tokens read per sample (K * T); the transformer runs on seq_length // K positions
    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None  # default: micro_batch_size * data-parallel size
    train_iters: Optional[int] = None
    train_tokens: Optional[int] = None  # alternative to train_iters: tokens read in this phase
    train_samples: Optional[int] = None  # Megatron-LM's alternative: samples of seq_length tokens
    seed: int = 1234
    bf16: bool = False
    fp16: bool = False  # fp16 weights and activations, fp32 master weights, loss scaling (OptimizerConfig)
    fp8: Fp8Config = field(default_factory=Fp8Config)
    log_interval: int = 100
    eval_interval: Optional[int] = None  # None: validate only at the end of the phase
    eval_iters: int = 100
    save: Optional[str] = None
    save_interval: Optional[int] = None
    ckpt_format: str = "torch_dist"  # Megatron-LM's --ckpt-format: torch_dist (any layout on load) or torch (legacy)
    load: Optional[str] = None  # resume from here if it holds a checkpoint
    no_load_optim: bool = False  # --load: weights and iteration; fresh optimizer and LR schedule
    no_load_rng: bool = False  # --load: this run's random streams, not the saved ones
    finetune: bool = False  # --load's weights only, from iteration 0 (becomes pretrained_checkpoint; load = save)
    disable_bf16_reduced_precision_matmul: bool = False  # CUDA: torch.backends.cuda.matmul flag
    pretrained_checkpoint: Optional[str] = None  # weights-only start (phase 2 from phase 1) when nothing to resume
    log_json: Optional[str] = None  # append one JSON line per logged step
    # Megatron-LM's early exits; the loop then saves (with --save) and returns normally (exit code 0).
    exit_signal_handler: bool = False  # SIGTERM / SIGUSR1 (Slurm's warning before a time limit)
    exit_interval: Optional[int] = None  # stop after an iteration divisible by this
    exit_duration_in_mins: Optional[float] = None  # stop after this much wall time
    check_for_nan_in_loss_and_grad: bool = True  # Megatron-LM's: a non-finite loss or gradient norm stops the run
    # Lines for the start-up log (flags accepted without effect, defaults chosen for the machine): said once by
    # rank 0, not part of what the run trains.
    notices: List[str] = field(default_factory=list)

    @property
    def num_patches(self) -> int:
        return self.seq_length // self.patch_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length

    def resolve(self, world_size: int) -> "TrainingConfig":
        """Derive defaults that depend on the launch and check everything; raises ConfigError."""
        self._check_patching()
        self._check_megatron_lm_options()
        self._check_model_class()
        data_parallel = self._check_layout(world_size)
        self._check_attention()
        self._check_optimizer_sharding()
        self._check_recompute()
        self._derive_batch_and_iterations(data_parallel)
        self._check_positions()
        self._check_schedule()
        self._check_files()
        return self

    def data_parallel_size(self, world_size: int) -> int:
        p = self.parallel
        return world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)

    def _check_patching(self) -> None:
        if self.patch_size < 1:
            raise ConfigError(f"--patch-size must be >= 1, got {self.patch_size}")
        if self.seq_length < 1 or self.seq_length % self.patch_size:
            raise ConfigError(
                f"--seq-length {self.seq_length} must be a positive multiple of --patch-size {self.patch_size}"
            )

    def _check_megatron_lm_options(self) -> None:
        """Megatron-LM's default layers, and its flags that take one value here or need another flag."""
        m, o = self.model, self.optim
        if m.transformer_impl is None:
            found = importlib.util.find_spec("transformer_engine") is not None
            m.transformer_impl = "transformer_engine" if found else "local"
            self.notices.append(f"--transformer-impl {m.transformer_impl} (Megatron-LM's default is "
                                f"transformer_engine; Transformer Engine {'imports' if found else 'is not installed'})")
        head = m.hidden_size // m.num_attention_heads
        if m.kv_channels is not None and m.kv_channels != head:
            raise ConfigError(f"--kv-channels {m.kv_channels}: only hidden size / attention heads ({head}) is "
                              f"supported here")
        if o.decoupled_min_lr is not None and o.decoupled_lr is None:
            raise ConfigError("--decoupled-min-lr needs --decoupled-lr")
        self._check_fp16()
        if self.parallel.grad_reduce_in_bf16 and not self.bf16:
            raise ConfigError("--grad-reduce-in-bf16 needs --bf16 (fp32 training reduces fp32 gradients)")
        if self.finetune:
            if not self.load or self.pretrained_checkpoint:
                raise ConfigError("--finetune starts from --load's weights: give --load and no "
                                  "--pretrained-checkpoint")
            # Megatron-LM's meaning, restart-safe: --load's weights start the run, which then resumes from --save.
            self.pretrained_checkpoint, self.load, self.finetune = self.load, self.save, False

    def _check_fp16(self) -> None:
        o = self.optim
        if self.fp16 and self.bf16:
            raise ConfigError("--fp16 and --bf16: choose one")
        if self.fp16 and self.deepspeed.enabled:
            raise ConfigError("--fp16 with --deepspeed is not supported here (DeepSpeed's own loss scaler is not "
                              "wired): use --bf16 with --deepspeed, or --fp16 without it")
        if o.min_loss_scale > o.initial_loss_scale:
            raise ConfigError(f"--min-loss-scale {o.min_loss_scale:g} is above --initial-loss-scale "
                              f"{o.initial_loss_scale:g}")

    def _check_model_class(self) -> None:
        """The hybrid model's layer pattern: it sets --num-layers (as in Megatron-LM); the local layers build
        attention and MLP layers only (megatron-core's Mamba and MoE hybrid layers are Transformer Engine ones)."""
        m, p = self.model, self.parallel
        if m.model_class not in MODEL_CLASSES:
            raise ConfigError(f"--model-class {m.model_class}: choose from {', '.join(MODEL_CLASSES)}")
        if m.hybrid_layer_pattern:
            m.model_class = "hybrid"
        if m.model_class == "gpt":
            return
        pattern = m.hybrid_layer_pattern
        if not pattern:
            raise ConfigError('--model-class hybrid needs --hybrid-layer-pattern (e.g. "*-*-": attention, MLP, ...)')
        if "|" in pattern or "/" in pattern:
            raise ConfigError(f"--hybrid-layer-pattern {pattern}: pipeline stage boundaries ('|') and multi-token "
                              f"prediction ('/') are not supported here")
        if m.transformer_impl == "local" and set(pattern) - set(LOCAL_HYBRID_LAYERS):
            other = "".join(sorted(set(pattern) - set(LOCAL_HYBRID_LAYERS)))
            raise ConfigError(
                f"--hybrid-layer-pattern {pattern}: layers '{other}' (Mamba 'M', MoE 'E', ...) are built from "
                f"Transformer Engine layers and, for Mamba, the mamba-ssm CUDA kernels: use --transformer-impl "
                f"transformer_engine on a GPU with mamba-ssm installed; the local layers build "
                + " and ".join(f"'{symbol}' ({name})" for symbol, name in LOCAL_HYBRID_LAYERS.items()))
        if "M" in pattern and importlib.util.find_spec("mamba_ssm") is None:
            raise ConfigError(f"--hybrid-layer-pattern {pattern}: Mamba layers ('M') need the mamba-ssm package "
                              f"(CUDA only: pip install mamba-ssm causal-conv1d), which is not installed")
        if p.pipeline_model_parallel_size > 1:
            raise ConfigError("--model-class hybrid: pipeline parallelism is not supported with the hybrid model "
                              "here (tensor and data parallelism are)")
        m.num_layers = len(pattern)

    def _check_layout(self, world_size: int) -> int:
        """Heads, layers and world size against the parallel layout; returns the data-parallel size."""
        m, p = self.model, self.parallel
        if not p.distributed_timeout_minutes > 0:
            raise ConfigError(f"--distributed-timeout-minutes must be > 0, got {p.distributed_timeout_minutes}")
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
        tp = p.tensor_model_parallel_size
        if p.sequence_parallel and tp == 1:
            p.sequence_parallel = False
            self.notices.append("--sequence-parallel turned off: --tensor-model-parallel-size is 1 (as Megatron-LM "
                                "does)")
        if p.sequence_parallel and self.num_patches % tp:
            raise ConfigError(
                f"--sequence-parallel needs --tensor-model-parallel-size {tp} to divide the {self.num_patches} "
                f"positions per sample (seq length / patch size)"
            )
        return self.data_parallel_size(world_size)

    def _check_optimizer_sharding(self) -> None:
        """Megatron-LM's rules for the distributed optimizer, its overlaps and the checkpoint format."""
        p = self.parallel
        if self.ckpt_format not in CKPT_FORMATS:
            raise ConfigError(f"--ckpt-format {self.ckpt_format}: choose from {', '.join(CKPT_FORMATS)}")
        if p.overlap_param_gather and not (p.use_distributed_optimizer and p.overlap_grad_reduce):
            raise ConfigError("--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce")
        if self.deepspeed.enabled and (p.use_distributed_optimizer or p.overlap_grad_reduce):
            raise ConfigError("--use-distributed-optimizer/--overlap-grad-reduce are megatron-core's; with --deepspeed "
                              "shard the optimizer with ZeRO (--zero-stage 1) instead")

    def _check_attention(self) -> None:
        """Implementation, backend and grouped-query attention against the heads and the tensor-parallel size."""
        m, tp = self.model, self.parallel.tensor_model_parallel_size
        if m.transformer_impl not in TRANSFORMER_IMPLS:
            raise ConfigError(f"--transformer-impl {m.transformer_impl}: choose from {', '.join(TRANSFORMER_IMPLS)}")
        if m.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"--attention-backend {m.attention_backend}: choose from {', '.join(ATTENTION_BACKENDS)}")
        if m.transformer_impl == "transformer_engine" and importlib.util.find_spec("transformer_engine") is None:
            raise ConfigError("--transformer-impl transformer_engine needs the transformer_engine package (GPU "
                              "only), which is not installed: use --transformer-impl local")
        if m.apply_layernorm_1p and m.transformer_impl != "transformer_engine":
            raise ConfigError("--apply-layernorm-1p needs Transformer Engine's norms (--transformer-impl "
                              "transformer_engine); the local layers' torch norms have no zero-centred weight")
        self._check_fp8()
        if not m.group_query_attention:
            if m.num_query_groups is not None:
                raise ConfigError(f"--num-query-groups {m.num_query_groups} needs --group-query-attention")
            return
        groups = m.query_groups
        if groups < 1 or m.num_attention_heads % groups:
            raise ConfigError(f"--num-attention-heads {m.num_attention_heads} is not divisible by "
                              f"--num-query-groups {groups}")
        if groups % tp:
            raise ConfigError(f"--num-query-groups {groups} is not divisible by --tensor-model-parallel-size {tp} "
                              f"(each tensor-parallel rank holds whole key/value groups)")

    def _check_fp8(self) -> None:
        f = self.fp8
        if f.format is None:
            if f.param_gather or f.first_last_layers_bf16:
                raise ConfigError(f"{'--fp8-param-gather' if f.param_gather else '--first-last-layers-bf16'} needs "
                                  f"--fp8-format")
            return
        given = f"--fp8-format {f.format}"
        if self.deepspeed.enabled:
            raise ConfigError(f"{given} with --deepspeed: fp8 runs on megatron-core's engine here; drop --deepspeed")
        if f.param_gather and not self.parallel.use_distributed_optimizer:
            raise ConfigError("--fp8-param-gather needs --use-distributed-optimizer (the fp8 weights are gathered "
                              "from its shards)")
        if f.first_last_layers_bf16:
            if f.recipe == "delayed":
                raise ConfigError("--first-last-layers-bf16 needs --fp8-recipe tensorwise, mxfp8 or blockwise "
                                  "(delayed scaling cannot keep layers in bf16)")
            per_stage = self.model.num_layers // self.parallel.pipeline_model_parallel_size
            for flag, value in (("--num-layers-at-start-in-bf16", f.num_layers_at_start_in_bf16),
                                ("--num-layers-at-end-in-bf16", f.num_layers_at_end_in_bf16)):
                if not 0 <= value <= per_stage:
                    raise ConfigError(f"{flag} {value}: at most the {per_stage} layers of a pipeline stage")
        if self.model.transformer_impl != "transformer_engine":  # last: the rules above hold on any machine
            raise ConfigError(f"{given} needs Transformer Engine's fp8 GEMMs (--transformer-impl transformer_engine, "
                              f"GPU only); the local layers compute in --bf16 at best")

    def _check_recompute(self) -> None:
        """megatron-core's recompute settings, checked against the layers of one model chunk."""
        m, p = self.model, self.parallel
        chunk = m.num_layers // p.pipeline_model_parallel_size // (p.virtual_pipeline_model_parallel_size or 1)
        if m.recompute_granularity is None:
            given = [flag for flag, value in [("--recompute-method", m.recompute_method),
                                              ("--recompute-num-layers", m.recompute_num_layers),
                                              ("--recompute-modules", m.recompute_modules)] if value is not None]
            if given:
                raise ConfigError(f"{', '.join(given)} needs --recompute-granularity")
        elif m.recompute_granularity == "full":
            if m.recompute_method not in ("uniform", "block") or m.recompute_num_layers is None:
                raise ConfigError("--recompute-granularity full needs --recompute-method uniform|block and "
                                  "--recompute-num-layers N")
            if m.recompute_modules is not None:
                raise ConfigError("--recompute-modules is for --recompute-granularity selective (full recomputes "
                                  "whole layers)")
            if not 1 <= m.recompute_num_layers <= chunk:
                raise ConfigError(f"--recompute-num-layers {m.recompute_num_layers} must be between 1 and the "
                                  f"{chunk} layers of each pipeline stage (model chunk)")
            if m.recompute_method == "uniform" and chunk % m.recompute_num_layers:
                raise ConfigError(f"--recompute-method uniform: --recompute-num-layers {m.recompute_num_layers} must "
                                  f"divide the {chunk} layers of each pipeline stage (model chunk)")
        elif m.recompute_granularity == "selective":
            if m.recompute_method is not None or m.recompute_num_layers is not None:
                raise ConfigError("--recompute-granularity selective takes no --recompute-method or "
                                  "--recompute-num-layers (it recomputes --recompute-modules in every layer)")
            unknown = sorted(set(m.recompute_modules or ()) - set(RECOMPUTE_MODULES))
            if unknown:
                raise ConfigError(f"--recompute-modules {' '.join(unknown)}: choose from "
                                  f"{', '.join(RECOMPUTE_MODULES)}")
            if "layernorm" in (m.recompute_modules or ()) and importlib.util.find_spec("transformer_engine") is None:
                # megatron-core 0.16's CheckpointWithoutOutput() takes itself for fp8 and asks Transformer Engine.
                raise ConfigError("--recompute-modules layernorm needs the transformer_engine package installed "
                                  "(megatron-core 0.16 asks it for the fp8 state); core_attn and mlp work without")
        else:
            raise ConfigError(f"--recompute-granularity {m.recompute_granularity}: choose full or selective")

    def _derive_batch_and_iterations(self, data_parallel: int) -> None:
        if self.global_batch_size is None:
            self.global_batch_size = self.micro_batch_size * data_parallel
        if self.global_batch_size % (self.micro_batch_size * data_parallel):
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} is not divisible by --micro-batch-size "
                f"{self.micro_batch_size} x data-parallel size {data_parallel}"
            )
        self.schedule_in_iterations()
        if (self.train_iters is None) == (self.train_tokens is None):
            raise ConfigError("give exactly one of --train-iters, --train-tokens and --train-samples")
        if self.train_iters is None:
            self.train_iters = iterations_for_tokens(self.train_tokens, self.tokens_per_step)
        if self.train_iters < 1:
            raise ConfigError(f"--train-iters must be >= 1, got {self.train_iters}")

    def schedule_in_iterations(self) -> None:
        """Megatron-LM's sample-based training (--train-samples, --lr-warmup-samples, --lr-decay-samples,
        --lr-wsd-decay-samples) as iterations of --global-batch-size samples: whole steps for the run (Megatron-LM's
        floor), fractional ones for the schedule, so the LR curve is Megatron-LM's. Its exclusions are checked;
        calling this again changes nothing (a plan converts before it splits the run into phases)."""
        o, batch = self.optim, self.global_batch_size
        by_samples = {"--lr-warmup-samples": o.lr_warmup_samples or None, "--lr-decay-samples": o.lr_decay_samples,
                      "--lr-wsd-decay-samples": o.lr_wsd_decay_samples}
        if self.train_samples is None:
            given = [flag for flag, value in by_samples.items() if value is not None]
            if given:
                raise ConfigError(f"{', '.join(given)} need{'s' if len(given) == 1 else ''} --train-samples (sample-"
                                  f"based training); with --train-iters give --lr-warmup-iters, --lr-decay-iters, "
                                  f"--lr-wsd-decay-iters")
        else:
            if self.train_iters is not None or self.train_tokens is not None:
                raise ConfigError("give exactly one of --train-iters, --train-tokens and --train-samples")
            by_iters = [flag for flag, value in [("--lr-warmup-iters", o.lr_warmup_iters or None),
                                                 ("--lr-decay-iters", o.lr_decay_iters),
                                                 ("--lr-wsd-decay-iters", o.lr_wsd_decay_iters)] if value is not None]
            if by_iters:
                raise ConfigError(f"--train-samples: give the schedule in samples too (Megatron-LM's rule), not "
                                  f"{', '.join(by_iters)}")
            self.train_iters = self.train_samples // batch
            if self.train_iters < 1:
                raise ConfigError(f"--train-samples {self.train_samples} is less than one step of "
                                  f"--global-batch-size {batch} samples")
            o.lr_warmup_iters = o.lr_warmup_samples / batch
            o.lr_decay_iters = None if o.lr_decay_samples is None else o.lr_decay_samples / batch
            o.lr_wsd_decay_iters = None if o.lr_wsd_decay_samples is None else o.lr_wsd_decay_samples / batch
            self.train_samples, o.lr_warmup_samples, o.lr_decay_samples, o.lr_wsd_decay_samples = None, 0, None, None
        if o.lr_warmup_fraction is not None:
            if o.lr_warmup_iters:
                raise ConfigError("give one of --lr-warmup-fraction and --lr-warmup-iters/--lr-warmup-samples")
            if not 0 <= o.lr_warmup_fraction < 1:
                raise ConfigError(f"--lr-warmup-fraction must be in [0, 1), got {o.lr_warmup_fraction}")

    def _check_positions(self) -> None:
        m = self.model
        if m.max_position_embeddings is None:
            m.max_position_embeddings = self.num_patches
        if m.position_embedding_type == "learned_absolute" and m.max_position_embeddings < self.num_patches:
            raise ConfigError(
                f"--max-position-embeddings {m.max_position_embeddings} < {self.num_patches} positions "
                f"(seq length {self.seq_length} / patch size {self.patch_size})"
            )

    def _check_schedule(self) -> None:
        o = self.optim
        if o.lr is None:
            raise ConfigError(LR_REQUIRED)
        if o.lr_decay_iters is None:
            o.lr_decay_iters = self.train_iters
        if o.lr_warmup_fraction is not None:
            o.lr_warmup_iters = o.lr_warmup_fraction * o.lr_decay_iters
        if o.lr_warmup_iters and o.lr_warmup_iters >= o.lr_decay_iters:
            raise ConfigError(
                f"--lr-warmup-iters {o.lr_warmup_iters:g} must be smaller than --lr-decay-iters {o.lr_decay_iters:g} "
                f"(default: the phase's iterations)"
            )
        if o.lr_decay_style not in LR_DECAY_STYLES:
            raise ConfigError(f"--lr-decay-style {o.lr_decay_style}: choose from {', '.join(LR_DECAY_STYLES)}")
        if o.lr_decay_style == "WSD":
            if o.lr_wsd_decay_iters is None or not 0 < o.lr_wsd_decay_iters <= o.lr_decay_iters - o.lr_warmup_iters:
                raise ConfigError(f"--lr-decay-style WSD needs --lr-wsd-decay-iters (or --lr-wsd-decay-samples): the "
                                  f"final decay, at most the {o.lr_decay_iters - o.lr_warmup_iters:g} iterations "
                                  f"after warmup; got {o.lr_wsd_decay_iters}")
            if o.lr_wsd_decay_style not in WSD_DECAY_STYLES:
                raise ConfigError(f"--lr-wsd-decay-style {o.lr_wsd_decay_style}: choose from "
                                  f"{', '.join(WSD_DECAY_STYLES)}")
        elif o.lr_wsd_decay_iters is not None:
            raise ConfigError("--lr-wsd-decay-iters/--lr-wsd-decay-samples need --lr-decay-style WSD")
        start, end = self.data.train_data_range
        if not 0.0 <= start < end <= 1.0:
            raise ConfigError(f"--train-data-range {start} {end}: need 0 <= start < end <= 1")
        if not self.data.per_split:
            check_split(self.data.split)
        if self.save_interval is not None and self.save is None:
            raise ConfigError("--save-interval needs --save")
        if not self.deepspeed.enabled and (self.deepspeed.config or self.deepspeed.zero_stage is not None):
            raise ConfigError("--deepspeed_config and --zero-stage need --deepspeed")

    def _check_files(self) -> None:
        """The tokenizer, then the data (a launch script's tokenizer is checked even when its data is missing)."""
        try:
            kind = TokenizerSpec.of(self.data).type
            if self.data.vocab_size is not None and kind != "NullTokenizer":
                # Megatron-LM's scripts pass it with every tokenizer; only NullTokenizer reads it.
                self.notices.append(f"--vocab-size {self.data.vocab_size}: no effect with {kind} (its vocabulary is "
                                    f"the tokenizer's)")
                self.data.vocab_size = None
            TokenizerSpec.of(self.data).resolved()  # the spec without the --vocab-size it does not read
        except TokenizerError as e:
            raise ConfigError(str(e)) from None
        self._read_data_args()
        d = self.data
        sources = [flag for flag, given in (("--mock-data", d.mock_data), ("--data-path", d.data_path),
                                            ("--train/valid/test-data-path", d.per_split)) if given]
        if len(sources) > 1:
            raise ConfigError(f"{' and '.join(sources)}: give one")
        if not sources:
            raise ConfigError("--data-path (or --data-args-path, --train-data-path, --per-split-data-args-path, or "
                              "--mock-data) is required")
        if d.per_split:
            if not d.train_data_path:
                raise ConfigError("--train-data-path is required with --valid-data-path/--test-data-path")
            if d.split != DEFAULT_SPLIT:
                raise ConfigError(f"--split {d.split} and --train-data-path: give one (with per-split data paths "
                                  f"each split is its own blend)")
        for flag, values in d.given_blends().items():
            for prefix in parse_blend(values, flag)[0]:
                for suffix in (".bin", ".idx"):
                    if not os.path.isfile(prefix + suffix):
                        raise ConfigError(f"{flag}: {prefix}{suffix} does not exist")
        if self.pretrained_checkpoint and not layout.has_tracker(self.pretrained_checkpoint):
            raise ConfigError(f"--pretrained-checkpoint {self.pretrained_checkpoint}: no {layout.TRACKER} there")


    def _read_data_args(self) -> None:
        """--data-args-path FILE: the --data-path values, whitespace-separated; --per-split-data-args-path FILE: a
        JSON object of the three splits' values (lists, or strings of them). Both as Megatron-LM reads them."""
        d = self.data
        if d.data_args_path is not None:
            if d.data_path:
                raise ConfigError("--data-path and --data-args-path: give one")
            values = _read_text(d.data_args_path, "--data-args-path").split()
            if not values:
                raise ConfigError(f"--data-args-path {d.data_args_path}: the file is empty (it should hold "
                                  f"--data-path's values, e.g. `0.7 data/a_text_document 0.3 data/b_text_document`)")
            d.data_path, d.data_args_path = values, None  # the run records the blend itself
        if d.per_split_data_args_path is not None:
            path, where = d.per_split_data_args_path, f"--per-split-data-args-path {d.per_split_data_args_path}"
            if d.per_split:
                raise ConfigError("--train/valid/test-data-path and --per-split-data-args-path: give one")
            try:
                values = json.loads(_read_text(path, "--per-split-data-args-path"))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not JSON ({e.msg} at line {e.lineno})") from None
            if not isinstance(values, dict) or not set(SPLITS) <= values.keys():
                raise ConfigError(f"{where}: need a JSON object with keys {', '.join(SPLITS)}, e.g. "
                                  f'{{"train": "0.7 data/a 0.3 data/b", "valid": ["data/c"], "test": []}}')
            for split in SPLITS:
                value = values[split].split() if isinstance(values[split], str) else values[split]
                if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
                    raise ConfigError(f"{where}: {split!r} must be a list of --{split}-data-path values or a string "
                                      f"of them")
                setattr(d, f"{split}_data_path", [str(v) for v in value])
            d.per_split_data_args_path = None


def _read_text(path: str, flag: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{flag} {path}: {getattr(e, 'strerror', None) or e}") from None


def token_level_view(cfg: TrainingConfig) -> TrainingConfig:
    """The run read at K=1 with the same positions per sample and tokens per step: how a patch-level (phase 1)
    model is validated at token level, on the samples phase 2 would validate on."""
    out = copy.deepcopy(cfg)
    out.patch_size, out.seq_length = 1, cfg.num_patches
    out.global_batch_size = cfg.global_batch_size * cfg.patch_size
    out.micro_batch_size = cfg.micro_batch_size * cfg.patch_size
    return out


def parse_blend(data_path: List[str], flag: str = "--data-path"):
    """Megatron's blend syntax, `prefix [prefix ...]` or `weight prefix [weight prefix ...]`: (prefixes, weights or
    None) in megatron-core's `blend` format. `flag`: the flag the values came from (for errors)."""
    if not data_path:
        return [], None  # --mock-data
    try:
        float(data_path[0])
    except ValueError:
        return list(data_path), None
    if len(data_path) % 2:
        raise ConfigError(f"{flag}: weighted blends need `weight prefix` pairs, got {len(data_path)} values")
    weights = []
    for text, prefix in zip(data_path[0::2], data_path[1::2]):
        try:
            weight = float(text)
        except ValueError:
            raise ConfigError(f"{flag}: the weight of {prefix} is {text!r}, not a number (a weighted blend is "
                              f"`weight prefix` pairs)") from None
        if not 0 < weight < math.inf:
            raise ConfigError(f"{flag}: the weight of {prefix} is {text}; weights must be positive numbers")
        weights.append(weight)
    return list(data_path[1::2]), weights


def check_split(split: str) -> None:
    """megatron-core reads the numbers in --split with a regex (a minus sign or a word is silently dropped): up to
    three non-negative weights, train, valid, test, with a positive sum."""
    try:
        values = [float(part) for part in re.split(r"[,/]", split)]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or not all(0 <= v < math.inf for v in values) or sum(values) <= 0:
        raise ConfigError(f"--split {split}: need up to 3 non-negative numbers (train,valid,test) with a positive "
                          f"sum, e.g. 969,30,1")


def to_dict(cfg: TrainingConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(values: dict, cls=TrainingConfig):
    """The config `to_dict` gave (a checkpoint's run.json); keys this version does not know are ignored."""
    out = cls()
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        if dataclasses.is_dataclass(getattr(out, f.name)):
            value = from_dict(value, type(getattr(out, f.name)))
        elif isinstance(getattr(out, f.name), tuple):
            value = tuple(value)
        setattr(out, f.name, value)
    return out
