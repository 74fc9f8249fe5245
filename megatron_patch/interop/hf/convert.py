"""HuggingFace export and import of this project's checkpoints (tools/export_hf.py, tools/import_hf.py): the
weights both ways, each direction one loop over the model family's table (families.py: which HF class, the weight
names, the transforms, the configs); files.py reads and writes the directories.

Only these tools and their tests import interop/hf/ (the trainer never does), so it may import `transformers`.
"""

from __future__ import annotations

import re
from typing import Optional

from megatron_patch.config.schema import ModelConfig
from megatron_patch.interop.hf.errors import ExportError
from megatron_patch.interop.hf.families import (
    EMBEDDING,
    as_hf_config,
    hf_config,
    hf_family,
    local_names,
    model_of_hf,
    shape,
    tensors,
)

# Buffers older HF files carry next to the weights (recomputed by the model classes).
_HF_BUFFERS = re.compile(r"(\.rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)$")


class _Weights:
    """Takes named tensors out of a state dict; names missing or never taken are ExportErrors."""

    def __init__(self, state: dict, what: str):
        self.state, self.what = dict(state), what

    def take(self, name: str):
        if name not in self.state:
            raise ExportError(f"{self.what} has no weight {name}")
        return self.state.pop(name)

    def check_all_taken(self, ignore=None) -> None:
        left = sorted(n for n in self.state if not (ignore and ignore(n)))
        if left:
            raise ExportError(f"{self.what} has weights the model config does not explain: {', '.join(left[:5])}"
                              + (" ..." if len(left) > 5 else ""))


def megatron_to_hf(full: dict, model: ModelConfig, vocab_size: int, special_tokens: Optional[dict] = None):
    """Full (unsharded, global names) weights of our GPTModel -> (HF state dict, HF config) of LlamaForCausalLM or
    GPT2LMHeadModel. `vocab_size`: the tokenizer's (the padded rows are cut); `special_tokens`: bos/eos/pad ids for
    the config. The RoPE base, norm epsilon, tying and sizes come from `model`."""
    family = hf_family(model)
    weights = _Weights(local_names(full), "the checkpoint")
    embedding = weights.state.get(EMBEDDING)
    if embedding is not None and embedding.size(0) < vocab_size:
        raise ExportError(f"the checkpoint's embedding has {embedding.size(0)} rows, fewer than the tokenizer's "
                          f"{vocab_size} pieces: another tokenizer?")
    out, sizes = {}, shape(model, vocab_size)
    for ours, theirs, transform in tensors(family, model):
        if transform is None:
            weights.state.pop(ours, None)  # tied: a pipeline's last stage keeps a copy of the embedding
        else:
            out.update(zip(theirs, transform.to_hf(weights.take(ours), sizes)))
    weights.check_all_taken()
    out = {name: t.contiguous() for name, t in out.items()}
    return out, hf_config(model, vocab_size, special_tokens or {})


def hf_to_megatron(hf_state: dict, hf_config):
    """(HF state dict, LlamaConfig / GPT2Config or config.json dict) -> (full weights under our global names,
    ModelConfig). The inverse of `megatron_to_hf`; vocabulary rows as the HF model has them."""
    config = as_hf_config(hf_config)
    model = model_of_hf(config)
    weights = _Weights(hf_state, "the HF model")
    full, sizes = {}, shape(model)
    for ours, theirs, transform in tensors(config.model_type, model):
        if transform is None:
            weights.state.pop(theirs[0], None)  # tied: the embedding itself
        else:
            full[ours] = transform.to_megatron(tuple(weights.take(name) for name in theirs), sizes)
    weights.check_all_taken(ignore=_HF_BUFFERS.search)
    return {name: t.contiguous() for name, t in full.items()}, model
