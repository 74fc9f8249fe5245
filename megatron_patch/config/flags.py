"""The command line of pretrain_patch_gpt.py (and tools/plan.py): Megatron-LM's flag names, grouped as in
`--help`, filling a TrainingConfig. One table drives parsing, help and error messages (`flag_for`).
`--model-preset NAME` sets the model flags of a preset (presets.py); flags given explicitly override it.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from dataclasses import dataclass, field

from megatron_patch.config import megatron_lm
from megatron_patch.config.presets import MODEL_PRESETS, RECIPES
from megatron_patch.config.schema import (
    ATTENTION_BACKENDS,
    CKPT_FORMATS,
    FP8_FORMATS,
    FP8_RECIPES,
    LR_DECAY_STYLES,
    MODEL_CLASSES,
    RECOMPUTE_MODULES,
    TRANSFORMER_IMPLS,
    WSD_DECAY_STYLES,
    TrainingConfig,
)
from megatron_patch.config.tokenizer import TOKENIZER_FLAGS
from megatron_patch.errors import OneLineErrorParser


@dataclass
class Flag:
    name: str
    path: str  # dotted TrainingConfig field
    help: str
    kwargs: dict = field(default_factory=dict)
    negated: bool = False  # the flag turns the field OFF (--disable-bias-linear -> add_bias_linear = False)

    @property
    def dest(self) -> str:
        return self.path.replace(".", "__")


ON = dict(action=argparse.BooleanOptionalAction)  # --x / --no-x: a preset may have turned it on

GROUPS = {
    "model": [
        Flag("--num-layers", "model.num_layers", "transformer layers", dict(type=int)),
        Flag("--hidden-size", "model.hidden_size", "hidden size", dict(type=int)),
        Flag("--num-attention-heads", "model.num_attention_heads", "attention heads", dict(type=int)),
        Flag("--ffn-hidden-size", "model.ffn_hidden_size",
             "MLP hidden size (default 4 x hidden; LLaMA: 8/3 x hidden with --swiglu)", dict(type=int)),
        Flag("--max-position-embeddings", "model.max_position_embeddings",
             "learned positions only: table size (default: seq-length / patch-size)", dict(type=int)),
        Flag("--normalization", "model.normalization", "layer norm type", dict(choices=["LayerNorm", "RMSNorm"])),
        Flag("--swiglu", "model.swiglu", "gated SiLU MLP (LLaMA) instead of GELU", ON),
        Flag("--position-embedding-type", "model.position_embedding_type",
             "positions of the decoder input (patch indices in phase 1)", dict(choices=["learned_absolute", "rope"])),
        Flag("--rotary-base", "model.rotary_base", "RoPE base", dict(type=int)),
        Flag("--disable-bias-linear", "model.add_bias_linear", "no biases in linear layers (LLaMA)", ON, negated=True),
        Flag("--untie-embeddings-and-output-weights", "model.untie_embeddings_and_output_weights",
             "separate input embedding and output layer (LLaMA)", ON),
        Flag("--hidden-dropout", "model.hidden_dropout", "dropout after attention and MLP", dict(type=float)),
        Flag("--attention-dropout", "model.attention_dropout", "dropout of attention probabilities",
             dict(type=float)),
        Flag("--init-method-std", "model.init_method_std", "std of the normal weight initialisation",
             dict(type=float)),
        Flag("--norm-epsilon", "model.norm_epsilon", "epsilon of the norm layers", dict(type=float)),
        Flag("--apply-layernorm-1p", "model.apply_layernorm_1p",
             "norm weights stored as (weight - 1), zero-centred (Transformer Engine's norms only)",
             dict(action="store_true")),
        Flag("--kv-channels", "model.kv_channels",
             "width of each attention head (default and only value here: hidden size / attention heads)",
             dict(type=int)),
        Flag("--transformer-impl", "model.transformer_impl",
             "layer implementation: megatron-core's local (torch) layers, or Transformer Engine's (GPU only; "
             "needs the transformer_engine package; checkpoints name the fused norms differently). Default: "
             "transformer_engine when it imports (Megatron-LM's default), else local, said at start-up",
             dict(choices=list(TRANSFORMER_IMPLS))),
        Flag("--attention-backend", "model.attention_backend",
             "core attention. Local layers: auto/flash/fused = torch's scaled_dot_product_attention (flash or "
             "memory-efficient kernels, no [s, s] scores kept), unfused/local = megatron-core's DotProductAttention "
             "(explicit scores and softmax); Transformer Engine: passed to megatron-core (TE's kernel choice). "
             "Same weights either way", dict(choices=list(ATTENTION_BACKENDS))),
        Flag("--group-query-attention", "model.group_query_attention",
             "grouped-query attention: --num-query-groups key/value heads shared by the query heads", ON),
        Flag("--num-query-groups", "model.num_query_groups",
             "with --group-query-attention: key/value groups (default 1); must divide --num-attention-heads and be "
             "divisible by --tensor-model-parallel-size", dict(type=int)),
        Flag("--model-class", "model.model_class",
             "megatron-core's GPTModel, or HybridModel (MambaModel before megatron-core 0.18) with layers from "
             "--hybrid-layer-pattern (a pattern selects hybrid)",
             dict(choices=list(MODEL_CLASSES))),
        Flag("--hybrid-layer-pattern", "model.hybrid_layer_pattern",
             "the hybrid model's layers, one symbol each: '*' attention, '-' MLP (local layers); 'M' Mamba, 'E' MoE "
             "(Transformer Engine, mamba-ssm; GPU only). Sets --num-layers. \"*-*-\" = a 2-layer GPT's layers",
             dict()),
    ],
    "patch-level training": [
        Flag("--patch-size", "patch_size",
             "K: tokens per patch. K > 1 trains at patch level (mean of K embeddings in, K-target loss out); "
             "1 = token level", dict(type=int)),
        Flag("--patch-fraction", "plan.patch_fraction",
             "lambda: run the two-phase plan, this fraction of the token budget at patch level (--seq-length, "
             "--global-batch-size, --train-tokens/--train-iters then describe the token-level run)", dict(type=float)),
        Flag("--phase", "plan.phase", "with --patch-fraction: the phase(s) this command runs (job chaining)",
             dict(choices=["1", "2", "both"])),
        *(Flag(f"--phase{n}-{name}", f"plan.phase{n}_{name.replace('-', '_')}",
               f"with --patch-fraction: phase {n}'s {what} (default: --{name}; the optimizer restarts per phase)",
               dict(type=kind))
          for n in (1, 2) for name, what, kind in (("lr", "peak learning rate", float),
                                                   ("lr-warmup-iters", "warmup steps", int),
                                                   ("decoupled-lr", "peak learning rate of the input embedding "
                                                    "and output layer", float))),
    ],
    "parallelism": [
        Flag("--tensor-model-parallel-size", "parallel.tensor_model_parallel_size", "tensor-parallel ranks",
             dict(type=int)),
        Flag("--pipeline-model-parallel-size", "parallel.pipeline_model_parallel_size", "pipeline stages",
             dict(type=int)),
        Flag("--num-layers-per-virtual-pipeline-stage", "parallel.num_layers_per_virtual_pipeline_stage",
             "interleaved 1F1B: layers per model chunk", dict(type=int)),
        Flag("--sequence-parallel", "parallel.sequence_parallel",
             "with tensor parallelism: norms and dropout on a slice of the sequence", dict(action="store_true")),
        Flag("--distributed-timeout-minutes", "parallel.distributed_timeout_minutes",
             "a collective (or the start-up rendezvous) waiting this long on a dead or stuck rank fails, and the "
             "process exits 1 (fractions of a minute allowed)", dict(type=float)),
        Flag("--use-distributed-optimizer", "parallel.use_distributed_optimizer",
             "megatron-core's distributed optimizer: fp32 master weights and Adam state sharded over the "
             "data-parallel ranks (ZeRO-1 style)", dict(action="store_true")),
        Flag("--overlap-grad-reduce", "parallel.overlap_grad_reduce",
             "reduce gradients bucket by bucket while the backward pass runs", dict(action="store_true")),
        Flag("--overlap-param-gather", "parallel.overlap_param_gather",
             "with --use-distributed-optimizer and --overlap-grad-reduce: all-gather the updated weights during the "
             "next forward pass", dict(action="store_true")),
        Flag("--grad-reduce-in-bf16", "parallel.grad_reduce_in_bf16",
             "with --bf16: reduce gradients over data-parallel ranks in bf16 (default: fp32)",
             dict(action="store_true")),
    ],
    "data": [
        Flag("--data-path", "data.data_path",
             "dataset prefix(es) from tools/preprocess_data.py, or a blend `W1 PREFIX1 W2 PREFIX2 ...`",
             dict(nargs="+")),
        Flag("--mock-data", "data.mock_data",
             "instead of --data-path: megatron-core's synthetic documents (ids 1, 2, 3, ... then EOD, random lengths; "
             "padded to whole patches at K > 1), to try a launch before any data is preprocessed",
             dict(action="store_true")),
        Flag("--data-args-path", "data.data_args_path",
             "a file holding the --data-path values (a long blend), as in Megatron-LM", dict()),
        Flag("--split", "data.split", "train,valid,test proportions of the documents", dict()),
        *[Flag(f"--{split}-data-path", f"data.{split}_data_path",
               f"instead of --data-path and --split: the {name} data's own prefix(es) or blend", dict(nargs="*"))
          for split, name in (("train", "training"), ("valid", "validation"), ("test", "test"))],
        Flag("--per-split-data-args-path", "data.per_split_data_args_path",
             'a JSON file of the three per-split blends, {"train": ..., "valid": ..., "test": ...} (each a list of '
             'values or a string of them), as in Megatron-LM', dict()),
        *[Flag(name, f"data.{field}", text, kwargs) for name, field, text, kwargs in TOKENIZER_FLAGS],
        Flag("--data-cache-path", "data.data_cache_path", "where megatron-core caches sample indices", dict()),
        Flag("--num-workers", "data.num_workers", "data loader worker processes", dict(type=int)),
        Flag("--train-data-range", "data.train_data_range",
             "[START, END) fractions of the training split's tokens this run reads (a plan sets it per phase)",
             dict(type=float, nargs=2, metavar=("START", "END"))),
    ],
    "training": [
        Flag("--seq-length", "seq_length", "tokens read per sample (K x positions)", dict(type=int)),
        Flag("--micro-batch-size", "micro_batch_size", "samples per forward/backward per data-parallel rank",
             dict(type=int)),
        Flag("--global-batch-size", "global_batch_size",
             "samples per optimizer step (default: micro-batch x data-parallel size; more = accumulation)",
             dict(type=int)),
        Flag("--train-iters", "train_iters", "optimizer steps", dict(type=int)),
        Flag("--train-tokens", "train_tokens", "tokens to read, instead of --train-iters", dict(type=int)),
        Flag("--train-samples", "train_samples",
             "samples to read, instead of --train-iters (Megatron-LM's sample-based training: give the schedule in "
             "samples too)", dict(type=int)),
        Flag("--seed", "seed", "random seed (weights, data order, dropout)", dict(type=int)),
        Flag("--bf16", "bf16", "bf16 weights and activations, fp32 master weights", dict(action="store_true")),
        Flag("--fp16", "fp16", "fp16 weights and activations, fp32 master weights, loss scaling (dynamic unless "
             "--loss-scale): a step whose gradients overflow is skipped and the scale halves",
             dict(action="store_true")),
        Flag("--fp8-format", "fp8.format",
             "Transformer Engine's fp8 GEMMs in the transformer layers (GPU, --transformer-impl transformer_engine): "
             "e4m3, or hybrid (e5m2 gradients); with --bf16 or --fp16 for the rest", dict(choices=list(FP8_FORMATS))),
        Flag("--fp8-recipe", "fp8.recipe", "fp8 scaling: delayed (amax history), tensorwise (current), mxfp8 "
             "(Blackwell), blockwise", dict(choices=list(FP8_RECIPES))),
        Flag("--fp8-margin", "fp8.margin", "delayed scaling: the margin of the scaling factor", dict(type=int)),
        Flag("--fp8-amax-history-len", "fp8.amax_history_len", "delayed scaling: the amax history's length",
             dict(type=int)),
        Flag("--fp8-amax-compute-algo", "fp8.amax_compute_algo", "delayed scaling: the amax of the history",
             dict(choices=["most_recent", "max"])),
        Flag("--no-fp8-wgrad", "fp8.wgrad", "the weight gradients' GEMMs in higher precision",
             dict(action="store_true"), negated=True),
        Flag("--fp8-param-gather", "fp8.param_gather",
             "keep the weights in fp8 and all-gather them so (needs --use-distributed-optimizer)",
             dict(action="store_true")),
        Flag("--first-last-layers-bf16", "fp8.first_last_layers_bf16",
             "the first and last transformer layers outside fp8 (not with --fp8-recipe delayed)",
             dict(action="store_true")),
        Flag("--num-layers-at-start-in-bf16", "fp8.num_layers_at_start_in_bf16",
             "with --first-last-layers-bf16: layers at the start kept out of fp8", dict(type=int)),
        Flag("--num-layers-at-end-in-bf16", "fp8.num_layers_at_end_in_bf16",
             "with --first-last-layers-bf16: layers at the end kept out of fp8", dict(type=int)),
        Flag("--disable-bf16-reduced-precision-matmul", "disable_bf16_reduced_precision_matmul",
             "CUDA: no reduced-precision reductions in bf16 matmuls (torch.backends.cuda.matmul)",
             dict(action="store_true")),
        Flag("--recompute-granularity", "model.recompute_granularity",
             "activation recompute: full = whole layers (see --recompute-method), selective = --recompute-modules "
             "of every layer. The default core_attn saves little with the SDPA attention backend (it keeps no "
             "[s, s] scores to drop) and only recomputes it; it pays with --attention-backend unfused",
             dict(choices=["full", "selective"])),
        Flag("--recompute-method", "model.recompute_method",
             "full recompute: uniform = checkpoint every group of --recompute-num-layers layers, block = only the "
             "first --recompute-num-layers layers of each pipeline stage", dict(choices=["uniform", "block"])),
        Flag("--recompute-num-layers", "model.recompute_num_layers",
             "full recompute: layers per checkpointed group (uniform) or layers recomputed per stage (block)",
             dict(type=int)),
        Flag("--recompute-modules", "model.recompute_modules",
             "selective recompute: the parts of each layer to recompute (default: core_attn; layernorm needs "
             "Transformer Engine installed)",
             dict(nargs="+", choices=list(RECOMPUTE_MODULES))),
        Flag("--exit-signal-handler", "exit_signal_handler",
             "on SIGTERM/SIGUSR1 finish the step, save and exit 0", dict(action="store_true")),
        Flag("--exit-interval", "exit_interval", "stop (and save) after an iteration divisible by this",
             dict(type=int)),
        Flag("--exit-duration-in-mins", "exit_duration_in_mins", "stop (and save) after this much wall time",
             dict(type=float)),
        Flag("--check-for-nan-in-loss-and-grad", "check_for_nan_in_loss_and_grad",
             "stop (exit 1, nothing saved) when the loss or the gradient norm is not finite, naming the step and "
             "the last good checkpoint; --no-check-for-nan-in-loss-and-grad (Megatron-LM's flag) trains on", ON),
    ],
    "optimizer": [
        Flag("--lr", "optim.lr", "peak learning rate (AdamW); required unless --recipe sets it", dict(type=float)),
        Flag("--min-lr", "optim.min_lr", "learning rate at the end of the decay", dict(type=float)),
        Flag("--decoupled-lr", "optim.decoupled_lr", "peak learning rate of the input embedding and output layer",
             dict(type=float)),
        Flag("--decoupled-min-lr", "optim.decoupled_min_lr", "with --decoupled-lr: their final learning rate",
             dict(type=float)),
        Flag("--lr-decay-style", "optim.lr_decay_style",
             "decay after warmup (WSD: constant, then --lr-wsd-decay-iters of decay at the end)",
             dict(choices=list(LR_DECAY_STYLES))),
        Flag("--lr-warmup-iters", "optim.lr_warmup_iters", "linear warmup steps (per phase)", dict(type=int)),
        Flag("--lr-warmup-fraction", "optim.lr_warmup_fraction",
             "warmup as a fraction of the decay steps (of each phase), instead of --lr-warmup-iters",
             dict(type=float)),
        Flag("--lr-decay-iters", "optim.lr_decay_iters", "decay steps (default: the phase's iterations)",
             dict(type=int)),
        Flag("--lr-warmup-samples", "optim.lr_warmup_samples", "with --train-samples: warmup in samples",
             dict(type=int)),
        Flag("--lr-decay-samples", "optim.lr_decay_samples",
             "with --train-samples: decay in samples (default: --train-samples)", dict(type=int)),
        Flag("--lr-wsd-decay-style", "optim.lr_wsd_decay_style", "WSD: the shape of the final decay",
             dict(choices=list(WSD_DECAY_STYLES))),
        Flag("--lr-wsd-decay-iters", "optim.lr_wsd_decay_iters", "WSD: iterations of the final decay",
             dict(type=int)),
        Flag("--lr-wsd-decay-samples", "optim.lr_wsd_decay_samples",
             "WSD with --train-samples: samples of the final decay", dict(type=int)),
        Flag("--weight-decay", "optim.weight_decay", "decoupled weight decay (not on biases and norms)",
             dict(type=float)),
        Flag("--adam-beta1", "optim.adam_beta1", "Adam beta1", dict(type=float)),
        Flag("--adam-beta2", "optim.adam_beta2", "Adam beta2", dict(type=float)),
        Flag("--adam-eps", "optim.adam_eps", "Adam epsilon", dict(type=float)),
        Flag("--clip-grad", "optim.clip_grad", "clip the global gradient norm to this", dict(type=float)),
        Flag("--loss-scale", "optim.loss_scale", "--fp16: a static loss scale instead of the dynamic one",
             dict(type=float)),
        Flag("--initial-loss-scale", "optim.initial_loss_scale", "--fp16: the dynamic loss scale's start",
             dict(type=float)),
        Flag("--min-loss-scale", "optim.min_loss_scale",
             "--fp16: the dynamic loss scale's floor; gradients that overflow even there stop the run",
             dict(type=float)),
        Flag("--loss-scale-window", "optim.loss_scale_window",
             "--fp16: steps without overflow before the dynamic loss scale doubles", dict(type=int)),
        Flag("--hysteresis", "optim.hysteresis", "--fp16: overflowing steps before the dynamic loss scale halves",
             dict(type=int)),
    ],
    "logging and evaluation": [
        Flag("--log-interval", "log_interval", "iterations between log lines", dict(type=int)),
        Flag("--log-json", "log_json", "append one JSON line per step and a summary per phase to this file", dict()),
        Flag("--eval-interval", "eval_interval", "iterations between validation runs", dict(type=int)),
        Flag("--eval-iters", "eval_iters", "global batches per validation run", dict(type=int)),
        Flag("--tensorboard-dir", "tracking.tensorboard_dir",
             "write TensorBoard event files here (x axis: cumulative tokens of the run, both phases)", dict()),
        Flag("--wandb-project", "tracking.wandb_project", "log to Weights & Biases (WANDB_MODE=offline works)",
             dict()),
        Flag("--wandb-exp-name", "tracking.wandb_exp_name", "the W&B run name", dict()),
        Flag("--wandb-save-dir", "tracking.wandb_save_dir", "the W&B run directory", dict()),
        Flag("--log-throughput", "tracking.log_throughput", "TFLOP/s per device and MFU in the log line as well",
             dict(action="store_true")),
        Flag("--log-memory-to-tensorboard", "tracking.log_memory_to_tensorboard",
             "peak memory of rank 0 (GPU: allocated; CPU: resident) to TensorBoard/W&B", dict(action="store_true")),
        Flag("--log-validation-ppl-to-tensorboard", "tracking.log_validation_ppl_to_tensorboard",
             "validation perplexities to TensorBoard/W&B, not only losses", dict(action="store_true")),
        Flag("--peak-tflops", "tracking.peak_tflops",
             "peak TFLOP/s of one device for MFU (default: the device table in flops.py; on CPU a matmul probe)",
             dict(type=float)),
    ],
    "checkpointing": [
        Flag("--save", "save", "checkpoint directory to write (Megatron-LM layout, atomic tracker)", dict()),
        Flag("--save-interval", "save_interval", "iterations between checkpoints (one is always saved at the end)",
             dict(type=int)),
        Flag("--ckpt-format", "ckpt_format",
             "checkpoint format written by --save: torch_dist (megatron-core dist_checkpointing, Megatron-LM's "
             "default; --load reads it into any TP/PP/DP layout) or torch (legacy: one file per model-parallel "
             "rank). --load and --pretrained-checkpoint read both", dict(choices=list(CKPT_FORMATS))),
        Flag("--load", "load", "resume from this checkpoint directory if it holds one", dict()),
        Flag("--pretrained-checkpoint", "pretrained_checkpoint",
             "start from these weights only (fresh optimizer and LR schedule; any parallel layout), e.g. phase 1's",
             dict()),
        Flag("--no-load-optim", "no_load_optim",
             "--load: resume the weights and the iteration, with a fresh optimizer and LR schedule",
             dict(action="store_true")),
        Flag("--no-load-rng", "no_load_rng", "--load: keep this run's random streams (dropout), not the saved ones",
             dict(action="store_true")),
        Flag("--finetune", "finetune",
             "--load: the weights only, from iteration 0 (fresh optimizer, LR schedule, RNG and data order); "
             "later restarts resume from --save as usual", dict(action="store_true")),
    ],
    "DeepSpeed": [
        Flag("--deepspeed", "deepspeed.enabled", "data parallelism and ZeRO through a DeepSpeed engine",
             dict(action="store_true")),
        Flag("--deepspeed_config", "deepspeed.config",
             "DeepSpeed JSON; our flags fill its \"auto\"/missing values (deepspeed_configs/)", dict()),
        Flag("--zero-stage", "deepspeed.zero_stage", "overrides the JSON's zero_optimization.stage",
             dict(type=int, choices=[0, 1, 2, 3])),
    ],
}
FLAGS = [flag for flags in GROUPS.values() for flag in flags]


def _number(kind, low: float, low_included: bool = True, high: float = float("inf")):
    """An argparse type: a finite `kind` in [low, high) (or (low, high) when not `low_included`); anything else is
    argparse's one-line error naming the flag."""
    bound = f">= {low:g}" if low_included else f"> {low:g}"
    if high != float("inf"):
        bound = f"in [{low:g}, {high:g})"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got "
                                             f"{text!r}") from None
        if not (low <= value if low_included else low < value) or not value < high:
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


positive_int, non_negative_int = _number(int, 1), _number(int, 0)
positive_float, non_negative_float = _number(float, 0, False), _number(float, 0)
probability = _number(float, 0, True, 1)
# Numeric flags take positive values (ints) or finite non-negative ones (floats) unless listed here; flags whose
# range the configuration checks with its own message (e.g. --patch-size, --seq-length) keep plain int/float.
VALUE_TYPES = {
    "--num-workers": non_negative_int, "--seed": non_negative_int, "--lr-warmup-iters": non_negative_int,
    "--phase1-lr-warmup-iters": non_negative_int, "--phase2-lr-warmup-iters": non_negative_int,
    "--eval-iters": non_negative_int, "--lr-warmup-samples": non_negative_int, "--lr-warmup-fraction": probability,
    "--hidden-dropout": probability, "--attention-dropout": probability, "--adam-beta1": probability,
    "--adam-beta2": probability,
    "--init-method-std": positive_float, "--norm-epsilon": positive_float, "--adam-eps": positive_float,
    "--exit-duration-in-mins": positive_float, "--peak-tflops": positive_float, "--loss-scale": positive_float,
    "--initial-loss-scale": positive_float, "--min-loss-scale": positive_float,
    "--fp8-margin": non_negative_int, "--num-layers-at-start-in-bf16": non_negative_int,
    "--num-layers-at-end-in-bf16": non_negative_int,
}
CONFIG_CHECKED = {"--patch-size", "--seq-length", "--train-iters", "--patch-fraction", "--train-data-range",
                  "--distributed-timeout-minutes"}


def value_type(flag: Flag):
    """The argparse type of a flag (VALUE_TYPES, or the rule above)."""
    kind = flag.kwargs.get("type")
    if kind not in (int, float) or flag.name in CONFIG_CHECKED or "choices" in flag.kwargs:
        return kind
    return VALUE_TYPES.get(flag.name, positive_int if kind is int else non_negative_float)


def flag_for(path: str) -> str:
    """The command-line flag of a config field (`model.hidden_size` -> `--hidden-size`)."""
    return next((flag.name for flag in FLAGS if flag.path == path), path)


def _get(obj, path):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set(obj, path, value):
    *parents, leaf = path.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, leaf, value)


# Megatron-LM requires these (no default there); a --model-preset gives the first three.
REQUIRED = ("--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length", "--micro-batch-size")
SET_BY_PRESET = REQUIRED[:3]
PLAN_REQUIRED = ("--seq-length",)  # tools/plan.py: the budget's flags only


def build_parser(prog: str = "pretrain_patch_gpt") -> argparse.ArgumentParser:
    # No abbreviations (Megatron-LM's rule too): a Megatron-LM flag this parser lacks must not be taken silently
    # for a longer flag of ours that it happens to start.
    parser = OneLineErrorParser(
        prog=prog, allow_abbrev=False, description="Patch-level (then token-level) GPT pretraining on megatron-core.",
        epilog="Defaults are Megatron-LM's; --recipe paper gives the paper's optimizer settings. Megatron-LM flags "
               "that are not listed here are taken as aliases, accepted without effect, or refused with a reason "
               "(megatron_patch/config/megatron_lm.py). See README.md.")
    presets = parser.add_argument_group("presets")
    presets.add_argument("--model-preset", choices=sorted(MODEL_PRESETS),
                         help="a named model (presets.py): the paper's LLaMA sizes or the CPU ones; explicit model "
                              "flags override it")
    presets.add_argument("--recipe", choices=sorted(RECIPES),
                         help="paper: the paper's optimizer settings (presets.py: AdamW 0.9/0.95, weight decay 0.1, "
                              "lr 3e-4 cosine to 3e-5, 2000 warmup iterations, clip 1.0) instead of Megatron-LM's "
                              "defaults; explicit flags override it")
    defaults = TrainingConfig()
    for title, flags in GROUPS.items():
        group = parser.add_argument_group(title)
        for flag in flags:
            kwargs = dict(flag.kwargs)
            if "type" in kwargs:
                kwargs["type"] = value_type(flag)
            default = None if flag.name in REQUIRED else _get(defaults, flag.path)
            if flag.negated:
                default = not default
            if kwargs.get("action") != "store_true":
                kwargs["default"] = default
            if not {"action", "choices", "metavar"} & kwargs.keys():
                kwargs["metavar"] = flag.name.lstrip("-").upper().replace("-", "_")  # as Megatron-LM shows them
            shown = f" (default: {default})" if default not in (None, False) and "nargs" not in kwargs else ""
            if flag.name in REQUIRED:
                shown = " (required" + (", or --model-preset)" if flag.name in SET_BY_PRESET else ")")
            group.add_argument(flag.name, dest=flag.dest, help=flag.help + shown, **kwargs)
    # Set by the deepspeed launcher; accepted so the same command line works under every launcher.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def _closest(flag: str) -> str:
    ours = ["--model-preset", "--recipe", *(flag.name for flag in FLAGS)]
    close = difflib.get_close_matches(flag, ours, n=1, cutoff=0.8)
    return f"{flag} (did you mean {close[0]}?)" if close else flag


def unknown_flags_message(unknown: list[str]) -> str:
    """Every unknown flag of a command line in one message, each with the closest flag of ours if one is close."""
    described = [_closest(token.split("=", 1)[0]) for token in unknown if token.startswith("-")]
    if not described:
        return f"unexpected arguments: {' '.join(unknown)}"
    return f"{len(described)} unknown flag{'s' if len(described) > 1 else ''}: {', '.join(described)} (see --help)"


def parse_args(argv=None, prog: str = "pretrain_patch_gpt", required=REQUIRED) -> TrainingConfig:
    """The TrainingConfig of a command line. Every problem argparse can see (unknown flags, refused Megatron-LM
    flags, missing `required` ones) is reported together, in one message."""
    parser = build_parser(prog)
    argv = sys.argv[1:] if argv is None else list(argv)
    known = {option for action in parser._actions for option in action.option_strings}
    foreign = megatron_lm.sort_out(argv, lambda flag: flag in known)
    preset, _ = parser.parse_known_args(foreign.argv)
    if preset.model_preset:
        values = MODEL_PRESETS[preset.model_preset]
        parser.set_defaults(**{f"model__{name}": value for name, value in values.items() if name != "add_bias_linear"},
                            model__add_bias_linear=not values["add_bias_linear"])
    if preset.recipe:
        parser.set_defaults(**{path.replace(".", "__"): value for path, value in RECIPES[preset.recipe].items()})
    args, unknown = parser.parse_known_args(foreign.argv)
    problems = []
    if unknown:
        problems.append(unknown_flags_message(unknown))
    if foreign.refused:
        problems.append(f"{len(foreign.refused)} Megatron-LM flag{'s' if len(foreign.refused) > 1 else ''} not "
                        f"supported here: {foreign.refusals()}")
    missing = [flag.name for flag in FLAGS if flag.name in required and getattr(args, flag.dest) is None]
    if missing:
        hint = " (or --model-preset NAME)" if set(missing) & set(SET_BY_PRESET) else ""
        problems.append(f"required: {', '.join(missing)}{hint}")
    if problems:
        parser.error(" | ".join(problems))
    cfg = TrainingConfig()
    for flag in FLAGS:
        value = getattr(args, flag.dest)
        if value is not None or flag.name not in REQUIRED:  # not required here: the field keeps its default
            _set(cfg, flag.path, (not value) if flag.negated else value)
    cfg.notices += foreign.notices
    return cfg
