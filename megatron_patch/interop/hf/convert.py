"""HuggingFace export and import of this project's checkpoints (tools/export_hf.py, tools/import_hf.py).

Only these tools and their tests import this module (the trainer never does), so it may import `transformers`.

Two HF model classes compute exactly what our GPTModel computes, and each maps weight for weight:

  LLaMA style (RMSNorm, SwiGLU, RoPE; biases optional) <-> LlamaForCausalLM
      embedding.word_embeddings            model.embed_tokens
      decoder.layers.i.input_layernorm     model.layers.i.input_layernorm
      ...self_attention.linear_qkv         model.layers.i.self_attn.{q,k,v}_proj: megatron-core's rows are grouped
                                           per query group as [q heads of the group; k; v] (see `split_qkv`)
      ...self_attention.linear_proj        model.layers.i.self_attn.o_proj
      ...pre_mlp_layernorm                 model.layers.i.post_attention_layernorm
      ...mlp.linear_fc1                    model.layers.i.mlp.{gate,up}_proj: [gate; up] (`split_gate_up`)
      ...mlp.linear_fc2                    model.layers.i.mlp.down_proj
      decoder.final_layernorm              model.norm
      output_layer                         lm_head (untied; tied models have none)
  GPT-2 style (LayerNorm, exact GELU, learned positions, biases) <-> GPT2LMHeadModel: the same, with GPT-2's
      Conv1D weights transposed ([in, out]) and c_attn = [q; k; v] concatenated whole, not per head.

Everything else (RMSNorm with a GELU MLP, SwiGLU with LayerNorm, rope with LayerNorm, learned positions with
RMSNorm, GPT-2 style without biases, tanh-approximated GELU, rope scaling, ...) is an ExportError naming the
feature. The padded vocabulary rows (a multiple of 128 x TP) are cut to the tokenizer's size on export.

`write_checkpoint` writes full tensors as a checkpoint of any TP x PP layout, sharded exactly as megatron-core
shards them (reshard.py's split), which --pretrained-checkpoint loads.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import glob
import json
import os
import pickle
import re
import shutil
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, GenerationConfig, GPT2Config, LlamaConfig, PretrainedConfig

from megatron_patch.checkpoint import layout, reshard, storage
from megatron_patch.config.schema import (
    DataConfig,
    ModelConfig,
    ParallelConfig,
    TrainingConfig,
    padded_vocab_size,
    to_dict,
)
from megatron_patch.config.tokenizer import TokenizerError, TokenizerSpec

LLAMA, GPT2 = "llama", "gpt2"
HF_CLASSES = {LLAMA: "LlamaForCausalLM", GPT2: "GPT2LMHeadModel"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
EMBEDDING, OUTPUT = reshard.VOCAB_ROWS
# Transformer Engine's layer specs fuse the norms into the next linear layer; our local spec names them apart.
_TE_NAMES = {
    ".self_attention.linear_qkv.layer_norm_weight": ".input_layernorm.weight",
    ".self_attention.linear_qkv.layer_norm_bias": ".input_layernorm.bias",
    ".mlp.linear_fc1.layer_norm_weight": ".pre_mlp_layernorm.weight",
    ".mlp.linear_fc1.layer_norm_bias": ".pre_mlp_layernorm.bias",
}
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LINEAR_MODULES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output_layer")
# Buffers older HF files carry next to the weights (recomputed by the model classes).
_HF_BUFFERS = re.compile(r"(\.rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)$")


class ExportError(ValueError):
    """A model one side cannot express (the message names the feature), or input that is not a complete
    checkpoint / HF model directory. Reported as one line by the tools."""


# -- which HF class ---------------------------------------------------------------------------------------------------
def num_query_groups(model: ModelConfig) -> int:
    """Key/value heads (HF's num_key_value_heads): --num-query-groups with --group-query-attention, else the heads."""
    return model.query_groups


def ffn_size(model: ModelConfig) -> int:
    return model.ffn_hidden_size or 4 * model.hidden_size  # megatron-core's default


def hf_family(model: ModelConfig) -> str:
    """LLAMA or GPT2: the HF model class that computes exactly this model; ExportError naming what neither can."""
    rms, rope = model.normalization == "RMSNorm", model.position_embedding_type == "rope"
    if rms and model.swiglu and rope:
        return LLAMA
    gpt2_needs = [need for ok, need in [
        (not rms, "--normalization LayerNorm"), (not model.swiglu, "a GELU MLP (no --swiglu)"),
        (not rope, "--position-embedding-type learned_absolute"),
        (model.add_bias_linear, "biases (no --disable-bias-linear)"),
        (num_query_groups(model) == model.num_attention_heads, "no grouped-query attention"),
    ] if not ok]
    if not gpt2_needs:
        return GPT2
    llama_needs = [need for ok, need in [
        (rms, "--normalization RMSNorm"), (model.swiglu, "--swiglu"), (rope, "--position-embedding-type rope"),
    ] if not ok]
    features = (f"{model.normalization}, {'SwiGLU' if model.swiglu else 'GELU'} MLP, {model.position_embedding_type} "
                f"positions, {'biases' if model.add_bias_linear else 'no biases'}")
    raise ExportError(f"no HuggingFace model class computes this model ({features}): LlamaForCausalLM needs "
                      f"{', '.join(llama_needs)}; GPT2LMHeadModel needs {', '.join(gpt2_needs)}")


# -- fused weights ----------------------------------------------------------------------------------------------------
def split_qkv(weight: torch.Tensor, heads: int, groups: int):
    """megatron-core's fused linear_qkv weight (or bias) -> (q, k, v). Its rows are grouped per query group:
    [q of the group's heads/groups heads (heads/groups * head_dim rows); k (head_dim); v (head_dim)] x groups."""
    per_group = heads // groups
    head_dim = weight.size(0) // (heads + 2 * groups)
    rest = weight.shape[1:]
    grouped = weight.reshape(groups, (per_group + 2) * head_dim, *rest)
    q, k, v = grouped.split([per_group * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(heads * head_dim, *rest), k.reshape(groups * head_dim, *rest),
            v.reshape(groups * head_dim, *rest))


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """Inverse of `split_qkv`."""
    head_dim = k.size(0) // groups
    rest = q.shape[1:]
    grouped = [q.reshape(groups, heads // groups * head_dim, *rest), k.reshape(groups, head_dim, *rest),
               v.reshape(groups, head_dim, *rest)]
    return torch.cat(grouped, dim=1).reshape(-1, *rest)


def split_gate_up(weight: torch.Tensor):
    """SwiGLU's fused linear_fc1 weight (or bias) -> (gate, up): megatron-core computes silu(first half) * second."""
    gate, up = weight.chunk(2, dim=0)
    return gate, up


def merge_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)


# -- megatron -> HF ---------------------------------------------------------------------------------------------------
def local_names(full: dict) -> dict:
    """Tensors only, under the local layer spec's names (Transformer Engine's fused norm names renamed)."""
    out = {}
    for name, tensor in full.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        for te, local in _TE_NAMES.items():
            if name.endswith(te):
                name = name[: -len(te)] + local
        out[name] = tensor
    return out


class _Weights:
    """Takes named tensors out of a state dict; names missing or never taken are ExportErrors."""

    def __init__(self, state: dict, what: str):
        self.state, self.what = dict(state), what

    def take(self, name: str) -> torch.Tensor:
        if name not in self.state:
            raise ExportError(f"{self.what} has no weight {name}")
        return self.state.pop(name)

    def take_if(self, present: bool, name: str) -> Optional[torch.Tensor]:
        return self.take(name) if present else None

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
    heads, groups, bias = model.num_attention_heads, num_query_groups(model), model.add_bias_linear
    embedding = weights.take(EMBEDDING)
    if embedding.size(0) < vocab_size:
        raise ExportError(f"the checkpoint's embedding has {embedding.size(0)} rows, fewer than the tokenizer's "
                          f"{vocab_size} pieces: another tokenizer?")
    out = {}
    prefix = "model" if family == LLAMA else "transformer"
    out[f"{prefix}.{'embed_tokens' if family == LLAMA else 'wte'}.weight"] = embedding[:vocab_size]
    if family == GPT2:
        out["transformer.wpe.weight"] = weights.take("embedding.position_embeddings.weight")
    for i in range(model.num_layers):
        layer = _Layer(weights, f"decoder.layers.{i}.", bias, model.normalization == "LayerNorm")
        q, k, v = split_qkv(layer.qkv, heads, groups)
        qkv_bias = split_qkv(layer.qkv_bias, heads, groups) if bias else (None, None, None)
        if family == LLAMA:
            hf = f"model.layers.{i}."
            gate, up = split_gate_up(layer.fc1)
            gate_bias, up_bias = split_gate_up(layer.fc1_bias) if bias else (None, None)
            tensors = {
                "input_layernorm.weight": layer.norm1, "post_attention_layernorm.weight": layer.norm2,
                "self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v,
                "self_attn.o_proj.weight": layer.proj, "mlp.gate_proj.weight": gate, "mlp.up_proj.weight": up,
                "mlp.down_proj.weight": layer.fc2,
                "self_attn.q_proj.bias": qkv_bias[0], "self_attn.k_proj.bias": qkv_bias[1],
                "self_attn.v_proj.bias": qkv_bias[2], "self_attn.o_proj.bias": layer.proj_bias,
                "mlp.gate_proj.bias": gate_bias, "mlp.up_proj.bias": up_bias, "mlp.down_proj.bias": layer.fc2_bias,
            }
        else:
            hf = f"transformer.h.{i}."
            tensors = {  # Conv1D: [in, out]
                "ln_1.weight": layer.norm1, "ln_1.bias": layer.norm1_bias,
                "ln_2.weight": layer.norm2, "ln_2.bias": layer.norm2_bias,
                "attn.c_attn.weight": torch.cat([q, k, v]).t(), "attn.c_attn.bias": torch.cat(qkv_bias),
                "attn.c_proj.weight": layer.proj.t(), "attn.c_proj.bias": layer.proj_bias,
                "mlp.c_fc.weight": layer.fc1.t(), "mlp.c_fc.bias": layer.fc1_bias,
                "mlp.c_proj.weight": layer.fc2.t(), "mlp.c_proj.bias": layer.fc2_bias,
            }
        out.update({hf + name: t for name, t in tensors.items() if t is not None})
    out[f"{prefix}.{'norm' if family == LLAMA else 'ln_f'}.weight"] = weights.take("decoder.final_layernorm.weight")
    if family == GPT2:
        out["transformer.ln_f.bias"] = weights.take("decoder.final_layernorm.bias")
    if model.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = weights.take(OUTPUT)[:vocab_size]
    else:
        weights.state.pop(OUTPUT, None)  # a pipeline's last stage keeps a copy of the tied embedding
    weights.check_all_taken()
    out = {name: t.contiguous() for name, t in out.items()}
    return out, hf_config(model, vocab_size, special_tokens or {})


class _Layer:
    """One transformer layer's megatron tensors."""

    def __init__(self, weights: _Weights, p: str, bias: bool, layer_norm: bool):
        self.norm1 = weights.take(p + "input_layernorm.weight")
        self.norm1_bias = weights.take_if(layer_norm, p + "input_layernorm.bias")
        self.norm2 = weights.take(p + "pre_mlp_layernorm.weight")
        self.norm2_bias = weights.take_if(layer_norm, p + "pre_mlp_layernorm.bias")
        self.qkv = weights.take(p + "self_attention.linear_qkv.weight")
        self.qkv_bias = weights.take_if(bias, p + "self_attention.linear_qkv.bias")
        self.proj = weights.take(p + "self_attention.linear_proj.weight")
        self.proj_bias = weights.take_if(bias, p + "self_attention.linear_proj.bias")
        self.fc1 = weights.take(p + "mlp.linear_fc1.weight")
        self.fc1_bias = weights.take_if(bias, p + "mlp.linear_fc1.bias")
        self.fc2 = weights.take(p + "mlp.linear_fc2.weight")
        self.fc2_bias = weights.take_if(bias, p + "mlp.linear_fc2.bias")


def hf_config(model: ModelConfig, vocab_size: int, special_tokens: dict) -> PretrainedConfig:
    """The LlamaConfig / GPT2Config of a model `hf_family` accepts."""
    family = hf_family(model)
    tokens = {key: special_tokens.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if family == LLAMA:
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=model.hidden_size, intermediate_size=ffn_size(model),
            num_hidden_layers=model.num_layers, num_attention_heads=model.num_attention_heads,
            num_key_value_heads=num_query_groups(model), head_dim=model.hidden_size // model.num_attention_heads,
            hidden_act="silu", max_position_embeddings=model.max_position_embeddings or 2048,
            initializer_range=model.init_method_std, rms_norm_eps=model.norm_epsilon,
            tie_word_embeddings=not model.untie_embeddings_and_output_weights,
            rope_parameters={"rope_type": "default", "rope_theta": float(model.rotary_base)},
            attention_bias=model.add_bias_linear, mlp_bias=model.add_bias_linear,
            attention_dropout=model.attention_dropout, architectures=[HF_CLASSES[LLAMA]], **tokens)
    return GPT2Config(
        vocab_size=vocab_size, n_positions=model.max_position_embeddings, n_embd=model.hidden_size,
        n_layer=model.num_layers, n_head=model.num_attention_heads, n_inner=ffn_size(model),
        activation_function="gelu",  # megatron-core's F.gelu: exact, not GPT-2's tanh approximation ("gelu_new")
        resid_pdrop=model.hidden_dropout, embd_pdrop=model.hidden_dropout, attn_pdrop=model.attention_dropout,
        layer_norm_epsilon=model.norm_epsilon, initializer_range=model.init_method_std,
        tie_word_embeddings=not model.untie_embeddings_and_output_weights, architectures=[HF_CLASSES[GPT2]],
        **tokens)


# -- HF -> megatron ---------------------------------------------------------------------------------------------------
def as_hf_config(hf_config) -> PretrainedConfig:
    """A PretrainedConfig from one, or from a config.json dict (older files' keys converted by transformers)."""
    if isinstance(hf_config, PretrainedConfig):
        return hf_config
    values = dict(hf_config)
    model_type = values.pop("model_type", None)
    if model_type not in (LLAMA, GPT2):
        raise ExportError(f"model_type {model_type!r}: only 'llama' (LlamaForCausalLM) and 'gpt2' (GPT2LMHeadModel) "
                          "can be imported")
    return AutoConfig.for_model(model_type, **values)


def hf_to_megatron(hf_state: dict, hf_config):
    """(HF state dict, LlamaConfig / GPT2Config or config.json dict) -> (full weights under our global names,
    ModelConfig). The inverse of `megatron_to_hf`; vocabulary rows as the HF model has them."""
    config = as_hf_config(hf_config)
    model = model_of_hf(config)
    weights = _Weights(hf_state, "the HF model")
    heads, groups, bias = model.num_attention_heads, num_query_groups(model), model.add_bias_linear
    llama = config.model_type == LLAMA
    full = {EMBEDDING: weights.take("model.embed_tokens.weight" if llama else "transformer.wte.weight")}
    if not llama:
        full["embedding.position_embeddings.weight"] = weights.take("transformer.wpe.weight")
    for i in range(model.num_layers):
        p = f"decoder.layers.{i}."
        if llama:
            hf = f"model.layers.{i}."
            tensors = {
                "input_layernorm.weight": weights.take(hf + "input_layernorm.weight"),
                "pre_mlp_layernorm.weight": weights.take(hf + "post_attention_layernorm.weight"),
                "self_attention.linear_qkv.weight": merge_qkv(
                    *(weights.take(f"{hf}self_attn.{x}_proj.weight") for x in "qkv"), heads, groups),
                "self_attention.linear_proj.weight": weights.take(hf + "self_attn.o_proj.weight"),
                "mlp.linear_fc1.weight": merge_gate_up(weights.take(hf + "mlp.gate_proj.weight"),
                                                       weights.take(hf + "mlp.up_proj.weight")),
                "mlp.linear_fc2.weight": weights.take(hf + "mlp.down_proj.weight"),
            }
            if bias:
                tensors.update({
                    "self_attention.linear_qkv.bias": merge_qkv(
                        *(weights.take(f"{hf}self_attn.{x}_proj.bias") for x in "qkv"), heads, groups),
                    "self_attention.linear_proj.bias": weights.take(hf + "self_attn.o_proj.bias"),
                    "mlp.linear_fc1.bias": merge_gate_up(weights.take(hf + "mlp.gate_proj.bias"),
                                                         weights.take(hf + "mlp.up_proj.bias")),
                    "mlp.linear_fc2.bias": weights.take(hf + "mlp.down_proj.bias"),
                })
        else:
            hf = f"transformer.h.{i}."
            q, k, v = weights.take(hf + "attn.c_attn.weight").t().chunk(3, dim=0)
            qb, kb, vb = weights.take(hf + "attn.c_attn.bias").chunk(3, dim=0)
            tensors = {
                "input_layernorm.weight": weights.take(hf + "ln_1.weight"),
                "input_layernorm.bias": weights.take(hf + "ln_1.bias"),
                "pre_mlp_layernorm.weight": weights.take(hf + "ln_2.weight"),
                "pre_mlp_layernorm.bias": weights.take(hf + "ln_2.bias"),
                "self_attention.linear_qkv.weight": merge_qkv(q, k, v, heads, groups),
                "self_attention.linear_qkv.bias": merge_qkv(qb, kb, vb, heads, groups),
                "self_attention.linear_proj.weight": weights.take(hf + "attn.c_proj.weight").t(),
                "self_attention.linear_proj.bias": weights.take(hf + "attn.c_proj.bias"),
                "mlp.linear_fc1.weight": weights.take(hf + "mlp.c_fc.weight").t(),
                "mlp.linear_fc1.bias": weights.take(hf + "mlp.c_fc.bias"),
                "mlp.linear_fc2.weight": weights.take(hf + "mlp.c_proj.weight").t(),
                "mlp.linear_fc2.bias": weights.take(hf + "mlp.c_proj.bias"),
            }
        full.update({p + name: t for name, t in tensors.items()})
    full["decoder.final_layernorm.weight"] = weights.take("model.norm.weight" if llama else "transformer.ln_f.weight")
    if not llama:
        full["decoder.final_layernorm.bias"] = weights.take("transformer.ln_f.bias")
    if model.untie_embeddings_and_output_weights:
        full[OUTPUT] = weights.take("lm_head.weight")
    else:
        weights.state.pop("lm_head.weight", None)  # tied: the embedding itself
    weights.check_all_taken(ignore=_HF_BUFFERS.search)
    return {name: t.contiguous() for name, t in full.items()}, model


def model_of_hf(c: PretrainedConfig) -> ModelConfig:
    """Our ModelConfig of an HF config, or ExportError naming what our model cannot compute."""
    def refuse(feature: str):
        raise ExportError(f"cannot import {HF_CLASSES[c.model_type]}: {feature}")

    if c.model_type == LLAMA:
        rope = dict(c.rope_parameters or {})
        theta = rope.get("rope_theta", 10000.0)
        if c.hidden_act != "silu":
            refuse(f"hidden_act={c.hidden_act!r} (our gated MLP is SwiGLU: 'silu')")
        groups = c.num_key_value_heads or c.num_attention_heads
        if groups < 1 or c.num_attention_heads % groups:
            refuse(f"num_key_value_heads={groups} does not divide num_attention_heads={c.num_attention_heads}")
        if c.head_dim * c.num_attention_heads != c.hidden_size:
            refuse(f"head_dim={c.head_dim} is not hidden_size / num_attention_heads")
        if rope.get("rope_type", "default") != "default":
            refuse(f"rope scaling {rope.get('rope_type')!r} (our RoPE has none)")
        if float(theta) != int(theta):
            refuse(f"rope_theta={theta} is not an integer (--rotary-base)")
        if c.attention_bias != c.mlp_bias:
            refuse(f"attention_bias={c.attention_bias} with mlp_bias={c.mlp_bias} (--disable-bias-linear is both)")
        return ModelConfig(
            num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
            group_query_attention=groups != c.num_attention_heads,
            num_query_groups=groups if groups != c.num_attention_heads else None,
            ffn_hidden_size=c.intermediate_size, max_position_embeddings=c.max_position_embeddings,
            normalization="RMSNorm", swiglu=True, position_embedding_type="rope", rotary_base=int(theta),
            add_bias_linear=bool(c.attention_bias), untie_embeddings_and_output_weights=not c.tie_word_embeddings,
            hidden_dropout=0.0, attention_dropout=float(c.attention_dropout), init_method_std=c.initializer_range,
            norm_epsilon=c.rms_norm_eps)
    if c.activation_function != "gelu":
        refuse(f"activation_function={c.activation_function!r} (our GELU is exact: 'gelu')")
    if not c.scale_attn_weights or c.scale_attn_by_inverse_layer_idx or c.add_cross_attention:
        refuse("attention scaling other than 1/sqrt(head_dim), or cross-attention")
    return ModelConfig(
        num_layers=c.n_layer, hidden_size=c.n_embd, num_attention_heads=c.n_head,
        ffn_hidden_size=c.n_inner or 4 * c.n_embd, max_position_embeddings=c.n_positions,
        normalization="LayerNorm", swiglu=False, position_embedding_type="learned_absolute",
        add_bias_linear=True, untie_embeddings_and_output_weights=not c.tie_word_embeddings,
        hidden_dropout=float(c.resid_pdrop), attention_dropout=float(c.attn_pdrop),
        init_method_std=c.initializer_range, norm_epsilon=c.layer_norm_epsilon)


# -- files ------------------------------------------------------------------------------------------------------------
def model_config(values: dict) -> ModelConfig:
    """A ModelConfig from a saved config's `model` dict (keys this version does not know are ignored)."""
    return ModelConfig(**{f.name: values[f.name] for f in dataclasses.fields(ModelConfig) if f.name in values})


@dataclasses.dataclass
class SavedCheckpoint:
    """A complete checkpoint iteration of any layout (DeepSpeed's consolidated weights included)."""

    root: str
    iteration: int
    directory: str
    config: dict  # the TrainingConfig dict it was trained with
    run: Optional[dict]  # run.json (None for checkpoints written without one)

    @property
    def model(self) -> ModelConfig:
        return model_config(self.config["model"])

    def full_weights(self) -> dict:
        """Every shard merged: full tensors under global names."""
        try:
            return reshard.full_state_dict(self.directory, reshard.sharding_for(self.model))
        except _READ_ERRORS as e:
            raise ExportError(f"{self.directory}: unreadable checkpoint ({type(e).__name__}: {e})") from None


_READ_ERRORS = (OSError, EOFError, RuntimeError, KeyError, json.JSONDecodeError, pickle.UnpicklingError)


def locate_checkpoint(root: str, iteration: Optional[int] = None) -> SavedCheckpoint:
    """The tracker's (or `iteration`'s) checkpoint under `root` with its config, after checking that every shard of
    its TP x PP layout is there; ExportError naming what is not."""
    if not os.path.isdir(root):
        raise ExportError(f"{root}: not a checkpoint directory")
    explicit = iteration is not None
    if iteration is None:
        try:
            iteration = layout.latest_iteration(root)
        except ValueError as e:
            raise ExportError(f"{root}: incomplete checkpoint: {e}") from None
        if iteration is None:
            raise ExportError(f"{root}: not a checkpoint directory (no {layout.TRACKER})")
    directory = layout.iteration_dir(root, iteration)
    if not os.path.isdir(directory) and explicit:
        raise ExportError(f"{root}: no checkpoint of iteration {iteration} ({os.path.basename(directory)})")
    if not os.path.isdir(directory):
        raise ExportError(f"{root}: incomplete checkpoint: no directory {os.path.basename(directory)} for iteration "
                          f"{iteration}")
    try:
        run = layout.read_run(root, iteration)
        if run is not None:
            config = run["config"]
        else:  # written without run.json: every shard carries the config
            shards = sorted(glob.glob(os.path.join(directory, "mp_rank_*", "model_optim_rng.pt")))
            if not shards:
                raise ExportError(f"{directory}: incomplete checkpoint: no mp_rank_*/model_optim_rng.pt shards")
            config = storage.read(shards[0])["config"]
        tp = config["parallel"]["tensor_model_parallel_size"]
        pp = config["parallel"]["pipeline_model_parallel_size"]
    except _READ_ERRORS as e:
        raise ExportError(f"{directory}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    # torch_dist: megatron-core writes metadata.json last, after every rank's shards.
    expected = ["metadata.json"] if reshard.is_torch_dist(directory) else [
        os.path.join(reshard.shard_dir_name(t, p, pp), "model_optim_rng.pt") for t in range(tp) for p in range(pp)]
    missing = [name for name in expected if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        raise ExportError(f"{directory}: incomplete checkpoint: missing {', '.join(missing)} (TP={tp} x PP={pp})")
    return SavedCheckpoint(root, iteration, directory, config, run)


def save_hf(out_dir: str, state: dict, config: PretrainedConfig, dtype: torch.dtype) -> None:
    """config.json, model.safetensors and generation_config.json of an HF model directory."""
    os.makedirs(out_dir, exist_ok=True)
    config.dtype = str(dtype).removeprefix("torch.")
    save_file({name: t.to(dtype).contiguous() for name, t in state.items()}, os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)


def read_hf_config(hf_dir: str) -> PretrainedConfig:
    """config.json of an HF model directory as a LlamaConfig / GPT2Config; ExportError for anything else."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ExportError(f"{hf_dir}: no config.json (not a HuggingFace model directory)")
    try:
        with open(path) as f:
            return as_hf_config(json.load(f))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise ExportError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def read_hf_weights(hf_dir: str) -> dict:
    """The state dict of an HF model directory: model.safetensors or pytorch_model.bin, sharded (*.index.json) or
    not (pickles are read with weights_only=True)."""
    found = next((name for name in WEIGHT_FILES if os.path.isfile(os.path.join(hf_dir, name))), None)
    if found is None:
        raise ExportError(f"{hf_dir}: no weights ({', '.join(WEIGHT_FILES)})")
    try:
        files = [found]
        if found.endswith(".index.json"):
            with open(os.path.join(hf_dir, found)) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for name in files:
            path = os.path.join(hf_dir, name)
            state.update(load_file(path) if name.endswith(".safetensors")
                         else torch.load(path, map_location="cpu", weights_only=True))
    except (*_READ_ERRORS, ValueError) as e:
        raise ExportError(f"{hf_dir}: unreadable weights ({type(e).__name__}: {e})") from None
    return state


def check_output(out: str, overwrite: bool) -> None:
    if os.path.lexists(out) and not overwrite:
        raise ExportError(f"{out} exists (--overwrite replaces it)")


@contextlib.contextmanager
def staged_directory(out: str, overwrite: bool):
    """Yields `OUT.tmp-<pid>` to write into; on success it becomes `out` (an existing `out` is refused unless
    `overwrite`: then it is renamed away, the new one renamed in, the old one deleted). On any failure or interrupt
    the temporary directory is removed and `out` is untouched."""
    check_output(out, overwrite)
    out = os.path.normpath(out)
    staging, old = f"{out}.tmp-{os.getpid()}", f"{out}.old-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
        check_output(out, overwrite)
        if os.path.lexists(out):
            os.replace(out, old)
            try:
                os.replace(staging, out)
            except BaseException:
                os.replace(old, out)
                raise
            if os.path.isdir(old):
                shutil.rmtree(old)
            else:
                os.remove(old)
        else:
            os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def import_config(model: ModelConfig, tp: int, pp: int, tokenizer: TokenizerSpec) -> dict:
    """The run config (TrainingConfig dict) a checkpoint imported from HF records: the model, the layout, the
    tokenizer; the rest defaults (only the model shape and the tokenizer are checked by a hand-off)."""
    return to_dict(TrainingConfig(
        model=model, parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
        data=DataConfig(**dataclasses.asdict(tokenizer)),
        seq_length=model.max_position_embeddings or TrainingConfig.seq_length))


def check_layout(model: ModelConfig, tp: int, pp: int) -> None:
    if tp < 1 or pp < 1 or model.num_attention_heads % tp or model.num_layers % pp:
        raise ExportError(f"--tensor-model-parallel-size {tp} must divide the {model.num_attention_heads} attention "
                          f"heads and --pipeline-model-parallel-size {pp} the {model.num_layers} layers")
    if num_query_groups(model) % tp:
        raise ExportError(f"--tensor-model-parallel-size {tp} must divide the {num_query_groups(model)} key/value "
                          f"groups (num_key_value_heads)")


def write_checkpoint(full: dict, cfg_dict: dict, out_root: str, tp: int, pp: int, iteration: int = 0) -> str:
    """Write full weights (global names) as a complete checkpoint of layout TP x PP in our layout: every
    `mp_rank_*/model_optim_rng.pt` holds what that rank's model chunk holds, sharded as megatron-core shards it
    (vocabulary rows zero-padded to a multiple of 128 x TP), then run.json, and the tracker last. The config
    records the layout; the tokenizer fingerprint is that of the config's data.tokenizer_model (when it exists).
    Returns the iteration directory."""
    cfg = copy.deepcopy(cfg_dict)
    cfg["parallel"].update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=False,
                           num_layers_per_virtual_pipeline_stage=None, virtual_pipeline_model_parallel_size=None)
    model = model_config(cfg["model"])
    check_layout(model, tp, pp)
    full = local_names(full)
    tied = not model.untie_embeddings_and_output_weights
    if tied:
        full.pop(OUTPUT, None)
    rows = padded_vocab_size(full[EMBEDDING].size(0), tp)
    sharding = reshard.sharding_for(model)
    per_stage = model.num_layers // pp
    directory = layout.iteration_dir(out_root, iteration)
    for pp_rank in range(pp):
        stage = _stage_weights(full, pp_rank, pp, per_stage, tied)
        for tp_rank in range(tp):
            shard = {}
            for name, tensor in stage.items():
                if name in reshard.VOCAB_ROWS:
                    tensor = reshard.fit_vocab_rows(tensor, rows)
                key = reshard.layout_key(name)
                if key in sharding:
                    tensor = reshard.split_shard(tensor, *sharding[key], tp_rank, tp)
                shard[name] = tensor.clone()  # no view: torch.save would write the whole storage
            for module in sorted({n.rsplit(".", 1)[0] for n in stage} | ({"output_layer"} if pp_rank == pp - 1
                                                                           else set())):
                if module.rsplit(".", 1)[-1] in _LINEAR_MODULES:
                    shard[module + "._extra_state"] = None  # as the model's state_dict has them
            path = os.path.join(directory, reshard.shard_dir_name(tp_rank, pp_rank, pp), "model_optim_rng.pt")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save({"model": shard, "iteration": iteration, "config": cfg}, path)
    try:
        fingerprint = TokenizerSpec.of(cfg["data"]).fingerprint()
    except TokenizerError:  # no tokenizer recorded, or its files are gone
        fingerprint = None
    run = {"config": cfg, "datasets": [], "tokenizer_sha256": fingerprint}
    layout.fsync_write(os.path.join(directory, layout.RUN_FILE), json.dumps(run, indent=2, sort_keys=True))
    layout.write_tracker(out_root, iteration)
    return directory


def _stage_weights(full: dict, pp_rank: int, pp: int, per_stage: int, tied: bool) -> dict:
    """The tensors of pipeline stage `pp_rank` under its local names (layers renumbered from 0)."""
    first, last, offset = pp_rank == 0, pp_rank == pp - 1, pp_rank * per_stage
    stage = {}
    for name, tensor in full.items():
        match = _LAYER.match(name)
        if match:
            if offset <= int(match.group(1)) < offset + per_stage:
                stage[reshard.renumber(name, -offset)] = tensor
        elif name.startswith("embedding.") and first or not name.startswith("embedding.") and last:
            stage[name] = tensor
    if tied and last and pp > 1:
        stage[OUTPUT] = full[EMBEDDING]  # megatron-core's last stage holds its own copy of the tied embedding
    return stage
