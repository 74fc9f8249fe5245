"""Megatron-LM's pretrain_gpt.py flags that are not flags of ours, so that a Megatron-LM launch script runs here
unchanged: each is an alias of one of ours, accepted without effect (said once at start-up, with why), or refused
with the reason and what to use instead. Never silently ignored; a flag in none of these tables is unknown.

The reference for names and meaning is Megatron-LM's megatron/training/arguments.py (its table, and the example
scripts the tests run, are in tests/data/megatron_lm/). `sort_out(argv)` takes these flags (and their values) out of
a command line before argparse reads the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

# flag -> the tokens of ours it stands for
ALIASES = {
    "--use-flash-attn": ["--attention-backend", "flash"],
    "--recompute-activations": ["--recompute-granularity", "selective"],
    "--disable-fp8-wgrad": ["--no-fp8-wgrad"],
}

_FUSED = "a kernel-fusion toggle: fusions are megatron-core's and Transformer Engine's choice here, numerically alike"
# flag -> why it changes nothing here
NO_EFFECT = {
    "--use-mcore-models": "megatron-core models are the only ones here",
    "--no-masked-softmax-fusion": _FUSED,
    "--no-bias-gelu-fusion": _FUSED,
    "--no-bias-swiglu-fusion": _FUSED,
    "--no-bias-dropout-fusion": _FUSED,
    "--no-rope-fusion": _FUSED,
    "--no-persist-layer-norm": _FUSED,
    "--cross-entropy-loss-fusion": "the K-target loss is this project's own cross-entropy (method/patch.py)",
    "--no-gradient-accumulation-fusion": "gradient-accumulation fusion needs apex/Transformer Engine; the local "
                                         "layers never fuse it",
    "--manual-gc": "Python's garbage collector is left as it is",
    "--empty-unused-memory-level": "torch's caching allocator is not emptied between steps",
    "--distributed-backend": "the backend follows the device: NCCL on CUDA, gloo on CPU",
    "--no-mmap-bin-files": "megatron-core's indexed dataset reads the .bin by mmap",
    "--no-create-attention-mask-in-dataloader": "no attention mask is built: attention is causal, masks are never "
                                                "read from the loader",
    "--logging-level": "log lines are the trainer's own (rank 0)",
    "--profile": "no profiler ranges are emitted (wrap the command in nsys or torch.profiler)",
    "--profile-step-start": "see --profile",
    "--profile-step-end": "see --profile",
    "--profile-ranks": "see --profile",
    "--record-memory-history": "see --profile",
    "--attention-softmax-in-fp32": "megatron-core's and torch's attention already compute the softmax in fp32",
    "--accumulate-allreduce-grads-in-fp32": "already so: gradients accumulate and reduce in fp32 (unless "
                                            "--grad-reduce-in-bf16)",
    "--calculate-per-token-loss": "every micro-batch has the same number of tokens and none is masked, so the mean "
                                  "per token and the mean per micro-batch are equal",
    "--tiktoken-pattern": "for TikTokenizer, which is not supported here (see --tokenizer-type)",
    "--fp8-interval": "deprecated: Transformer Engine's delayed scaling (>= 1.12) has no interval and rescales "
                      "every step",
    "--no-position-embedding": "positions come from --position-embedding-type: with rope no learned positions are "
                               "added to the embeddings; with learned_absolute they are",
}

_MOE = ("mixture-of-experts layers are not supported here (the dense GPT and the attention/MLP hybrid are); "
        "train a dense model")
_FSDP = "Megatron FSDP is not supported: shard with --use-distributed-optimizer, or --deepspeed --zero-stage 3"
_FP8 = ("not wired here: --fp8-format with the delayed, tensorwise, mxfp8 or blockwise recipe is; fp8 attention, "
        "fp8 output projections and custom quantizers are not")
_FP4 = "fp4 (NVFP4, Blackwell) is not supported here: use --fp8-format"
_GPT_OSS = "gpt-oss's attention and MLP variants are not supported here (a LLaMA-style dense GPT is)"
# flag -> why it is refused and what to use instead
REFUSED = {
    "--step-batch-size-schedule": "batch-size ramp-up is not supported: a patch-level plan keeps the tokens per step "
                                  "constant (the paper's recipe); give one --global-batch-size",
    "--rampup-batch-size": "batch-size ramp-up is not supported: give one --global-batch-size",
    "--num-experts": _MOE,
    "--use-megatron-fsdp": _FSDP,
    "--data-parallel-sharding-strategy": _FSDP,
    "--init-model-with-meta-device": _FSDP,
    "--use-nccl-ub": "NCCL user buffers (Megatron FSDP) are not supported",
    "--quick-geglu": _GPT_OSS,
    "--glu-linear-offset": _GPT_OSS,
    "--softmax-type": _GPT_OSS,
    "--window-size": "sliding-window attention is not supported here (full causal attention only)",
    "--window-attn-skip-freq": "sliding-window attention is not supported here (full causal attention only)",
    "--activation-func-clamp-value": _GPT_OSS,
    "--enable-gpt-oss": _GPT_OSS,
    "--export-force-local-attention": _GPT_OSS,
}
# a flag starting so -> why it is refused
REFUSED_FAMILIES = {"--moe-": _MOE, "--fsdp-": _FSDP, "--fp8-": _FP8, "--fp4-": _FP4}

# flag -> (the value(s) that change nothing, why those are accepted, why any other is refused)
BY_VALUE = {
    "--context-parallel-size": (["1"], "one context-parallel rank is the default",
                                "context parallelism (the sequence split over ranks) is not supported with "
                                "patch-level training here: use --tensor-model-parallel-size with "
                                "--sequence-parallel"),
    "--expert-model-parallel-size": (["1"], "no experts, so no expert parallelism", _MOE),
    "--rope-type": (["rope"], "plain RoPE is the rotary embedding here", "YaRN and other RoPE scalings are not "
                                                                        "supported here"),
    "--rotary-percent": (["1", "1.0"], "rotary embedding over the whole head, as here",
                         "partial rotary embeddings are not supported here: use --rotary-percent 1.0"),
}
# flag of ours -> its values Megatron-LM has and this project does not, with why
REFUSED_VALUES = {
    "--ckpt-format": {"fsdp_dtensor": _FSDP, "torch_dcp": "use torch_dist (megatron-core's dist_checkpointing over "
                      "torch.distributed.checkpoint)", "zarr": "use torch_dist"},
    "--fp8-recipe": {"custom": "a custom quantizer (--fp8-quantizer-factory) is not wired here: use delayed, "
                     "tensorwise, mxfp8 or blockwise"},
    "--transformer-impl": {"inference_optimized": "an inference-only layer implementation; use local or "
                           "transformer_engine"},
}


@dataclass
class SortedOut:
    """A command line with Megatron-LM's foreign flags taken out: what argparse reads, and what to say."""

    argv: List[str] = field(default_factory=list)
    notices: List[str] = field(default_factory=list)  # flags accepted without effect, with why
    refused: List[Tuple[str, str]] = field(default_factory=list)  # (the flag as given, why it is refused)

    def refusals(self) -> str:
        """The refused flags in one line, those refused for the same reason together."""
        by_reason: Dict[str, List[str]] = {}
        for given, why in self.refused:
            by_reason.setdefault(why, []).append(given)
        return "; ".join(f"{', '.join(flags)}: {why}" for why, flags in by_reason.items())


def refusal(flag: str) -> Optional[str]:
    """Why a flag with no value condition is refused (None: it is not)."""
    if flag in REFUSED:
        return REFUSED[flag]
    return next((why for prefix, why in REFUSED_FAMILIES.items() if flag.startswith(prefix)), None)


def sort_out(argv: List[str], ours: Callable[[str], bool]) -> SortedOut:
    """Take Megatron-LM's foreign flags (with the values that follow them) out of `argv`; aliases become our
    flags. `ours(flag)`: whether the flag is one of ours (never taken out). A flag's values are the tokens up to
    the next one starting with "--" (no flag of ours takes a value starting so)."""
    out = SortedOut()
    i = 0
    while i < len(argv):
        token = argv[i]
        flag, _, inline = token.partition("=")
        end = i + 1
        while not inline and end < len(argv) and not argv[end].startswith("--"):
            end += 1
        values = [inline] if inline else argv[i + 1:end]
        if not token.startswith("--") or (ours(flag) and flag not in REFUSED_VALUES):
            out.argv.append(token)
            i += 1
            continue
        if flag in REFUSED_VALUES:
            why = REFUSED_VALUES[flag].get(values[0] if values else None)
            if why:
                out.refused.append((f"{flag} {values[0]}", why))
                i = end
            else:
                out.argv.append(token)
                i += 1
            continue
        if flag in ALIASES:
            out.argv += ALIASES[flag]
        elif flag in NO_EFFECT:
            out.notices.append(f"{flag}: no effect here ({NO_EFFECT[flag]})")
        elif flag in BY_VALUE:
            accepted, why_accepted, why_refused = BY_VALUE[flag]
            if values and values[0] in accepted:
                out.notices.append(f"{flag} {values[0]}: no effect here ({why_accepted})")
            else:
                out.refused.append((" ".join([flag, *values]), why_refused))
        elif refusal(flag):
            out.refused.append((flag, refusal(flag)))
        else:  # unknown: argparse names it, with the closest flag of ours
            out.argv += argv[i:end]
        i = end
    return out


def tables() -> Dict[str, Dict[str, str]]:
    """Every foreign flag by how it is taken (README and the tests list them from here)."""
    return {"alias": {flag: " ".join(tokens) for flag, tokens in ALIASES.items()},
            "no effect": dict(NO_EFFECT),
            "refused": {**REFUSED, **{prefix + "*": why for prefix, why in REFUSED_FAMILIES.items()}}}
