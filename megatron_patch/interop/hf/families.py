"""The two HuggingFace model classes that compute exactly what our GPTModel computes, each as ONE table of weight
names that both directions read (convert.py's megatron_to_hf and hf_to_megatron), and the config conversion both
ways.

  LLaMA style (RMSNorm, SwiGLU, RoPE; biases optional)            <-> LlamaForCausalLM
  GPT-2 style (LayerNorm, exact GELU, learned positions, biases)  <-> GPT2LMHeadModel

A Row of a table is (our name, the HF name or names, transform, which models have the tensor). A transform is a
pair of inverse functions: to_hf (our tensor -> the HF tensors, one per HF name) and to_megatron (back).
megatron-core fuses what HF keeps apart: linear_qkv's rows are grouped per query group as [q heads of the group;
k; v] (`split_qkv`), SwiGLU's linear_fc1 is [gate; up] (`split_gate_up`); GPT-2's Conv1D weights are transposed
([in, out]) and its c_attn is [q; k; v] concatenated whole, not per head. The padded vocabulary rows (a multiple
of 128 x TP) are cut to the tokenizer's size on export.

Everything else (RMSNorm with a GELU MLP, SwiGLU with LayerNorm, rope with LayerNorm, learned positions with
RMSNorm, GPT-2 style without biases, tanh-approximated GELU, rope scaling, ...) is an ExportError naming the
feature.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import torch
from transformers import AutoConfig, GPT2Config, LlamaConfig, PretrainedConfig

from megatron_patch.checkpoint import reshard
from megatron_patch.config.schema import ModelConfig
from megatron_patch.interop.hf.errors import ExportError

LLAMA, GPT2 = "llama", "gpt2"
HF_CLASSES = {LLAMA: "LlamaForCausalLM", GPT2: "GPT2LMHeadModel"}
EMBEDDING, OUTPUT = reshard.VOCAB_ROWS
# Transformer Engine's layer specs fuse the norms into the next linear layer; our local spec names them apart.
_TE_NAMES = {
    ".self_attention.linear_qkv.layer_norm_weight": ".input_layernorm.weight",
    ".self_attention.linear_qkv.layer_norm_bias": ".input_layernorm.bias",
    ".mlp.linear_fc1.layer_norm_weight": ".pre_mlp_layernorm.weight",
    ".mlp.linear_fc1.layer_norm_bias": ".pre_mlp_layernorm.bias",
}


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


# -- which HF class ---------------------------------------------------------------------------------------------------
def num_query_groups(model: ModelConfig) -> int:
    """Key/value heads (HF's num_key_value_heads): --num-query-groups with --group-query-attention, else the heads."""
    return model.query_groups


def ffn_size(model: ModelConfig) -> int:
    return model.ffn_hidden_size or 4 * model.hidden_size  # megatron-core's default


def hf_family(model: ModelConfig) -> str:
    """LLAMA or GPT2: the HF model class that computes exactly this model; ExportError naming what neither can."""
    if model.model_class == "hybrid":
        raise ExportError(f"a hybrid model (--hybrid-layer-pattern {model.hybrid_layer_pattern}) has no HuggingFace "
                          f"export here: LlamaForCausalLM and GPT2LMHeadModel are GPT layers (--model-class gpt)")
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


# -- transforms: pairs of inverse functions ---------------------------------------------------------------------------
class Shape(NamedTuple):
    """What the transforms need to know of the model."""

    heads: int
    groups: int  # key/value heads
    vocab_size: Optional[int] = None  # the tokenizer's (export only)


class Transform(NamedTuple):
    """to_hf(our tensor, shape) -> the HF tensors (a tuple, one per HF name); to_megatron(the HF tensors, shape) ->
    our tensor. Each undoes the other."""

    to_hf: Callable
    to_megatron: Callable


def one_to_one(to_hf: Callable, to_megatron: Callable) -> Transform:
    """A Transform of one tensor into one tensor (its functions take and give a tensor, not a tuple)."""
    return Transform(lambda t, s: (to_hf(t, s),), lambda ts, s: to_megatron(ts[0], s))


def then(first: Transform, second: Transform) -> Transform:
    """One-to-one `first`, then one-to-one `second` on export; their inverses in reverse order on import."""
    return Transform(lambda t, s: second.to_hf(first.to_hf(t, s)[0], s),
                     lambda ts, s: first.to_megatron((second.to_megatron(ts, s),), s))


SAME = one_to_one(lambda t, s: t, lambda t, s: t)
CONV1D = one_to_one(lambda t, s: t.t(), lambda t, s: t.t())  # GPT-2's Conv1D weights are [in, out]
# Export cuts the padded rows; import keeps the HF model's rows (write_checkpoint pads them for the layout).
VOCAB = one_to_one(lambda t, s: t[:s.vocab_size], lambda t, s: t)
# split_qkv and split_gate_up are looked up when called: the tests swap them to see the logits check fail.
QKV = Transform(lambda t, s: split_qkv(t, s.heads, s.groups), lambda ts, s: merge_qkv(*ts, s.heads, s.groups))
GATE_UP = Transform(lambda t, s: split_gate_up(t), lambda ts, s: merge_gate_up(*ts))
QKV_WHOLE = one_to_one(lambda t, s: torch.cat(QKV.to_hf(t, s)),  # GPT-2's c_attn: [q; k; v], not per head
                       lambda t, s: QKV.to_megatron(t.chunk(3, dim=0), s))


# -- the tables -------------------------------------------------------------------------------------------------------
def biases(model: ModelConfig) -> bool:
    return model.add_bias_linear


def untied(model: ModelConfig) -> bool:
    """A tied model has no output layer of its own: the copy a checkpoint or an HF file may hold is dropped."""
    return model.untie_embeddings_and_output_weights


class Row(NamedTuple):
    """One tensor: our name, the HF name (a tuple of names when megatron-core fuses several), the transform, and
    which models have it (None: every model of the family)."""

    megatron: str
    hf: Union[str, tuple]
    transform: Transform = SAME
    when: Optional[Callable] = None


class Family(NamedTuple):
    """A model class's table: the rows before the layers, each layer's rows (our names under `decoder.layers.<i>.`,
    the HF names under `hf_layer` formatted with i), the rows after the layers; both directions go in this order."""

    first: tuple
    hf_layer: str
    layer: tuple
    last: tuple


FAMILIES = {
    LLAMA: Family(
        first=(Row(EMBEDDING, "model.embed_tokens.weight", VOCAB),),
        hf_layer="model.layers.{}.",
        layer=(
            Row("input_layernorm.weight", "input_layernorm.weight"),
            Row("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
            Row("self_attention.linear_qkv.weight",
                ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), QKV),
            Row("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
            Row("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), GATE_UP),
            Row("mlp.linear_fc2.weight", "mlp.down_proj.weight"),
            Row("self_attention.linear_qkv.bias",
                ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), QKV, biases),
            Row("self_attention.linear_proj.bias", "self_attn.o_proj.bias", SAME, biases),
            Row("mlp.linear_fc1.bias", ("mlp.gate_proj.bias", "mlp.up_proj.bias"), GATE_UP, biases),
            Row("mlp.linear_fc2.bias", "mlp.down_proj.bias", SAME, biases),
        ),
        last=(
            Row("decoder.final_layernorm.weight", "model.norm.weight"),
            Row(OUTPUT, "lm_head.weight", VOCAB, untied),
        ),
    ),
    GPT2: Family(
        first=(
            Row(EMBEDDING, "transformer.wte.weight", VOCAB),
            Row("embedding.position_embeddings.weight", "transformer.wpe.weight"),
        ),
        hf_layer="transformer.h.{}.",
        layer=(
            Row("input_layernorm.weight", "ln_1.weight"),
            Row("input_layernorm.bias", "ln_1.bias"),
            Row("pre_mlp_layernorm.weight", "ln_2.weight"),
            Row("pre_mlp_layernorm.bias", "ln_2.bias"),
            Row("self_attention.linear_qkv.weight", "attn.c_attn.weight", then(QKV_WHOLE, CONV1D)),
            Row("self_attention.linear_qkv.bias", "attn.c_attn.bias", QKV_WHOLE, biases),
            Row("self_attention.linear_proj.weight", "attn.c_proj.weight", CONV1D),
            Row("self_attention.linear_proj.bias", "attn.c_proj.bias", SAME, biases),
            Row("mlp.linear_fc1.weight", "mlp.c_fc.weight", CONV1D),
            Row("mlp.linear_fc1.bias", "mlp.c_fc.bias", SAME, biases),
            Row("mlp.linear_fc2.weight", "mlp.c_proj.weight", CONV1D),
            Row("mlp.linear_fc2.bias", "mlp.c_proj.bias", SAME, biases),
        ),
        last=(
            Row("decoder.final_layernorm.weight", "transformer.ln_f.weight"),
            Row("decoder.final_layernorm.bias", "transformer.ln_f.bias"),
            Row(OUTPUT, "lm_head.weight", VOCAB, untied),
        ),
    ),
}


def tensors(family: str, model: ModelConfig):
    """(our name, HF names (a tuple), transform) of each tensor `model` has, in its table's order, the layer rows
    once per layer. A tied model's output layer comes with transform None: drop its copy if there is one."""
    table = FAMILIES[family]
    layers = [(f"decoder.layers.{i}.", table.hf_layer.format(i), table.layer) for i in range(model.num_layers)]
    for ours, theirs, rows in [("", "", table.first), *layers, ("", "", table.last)]:
        for row in rows:
            present = row.when is None or row.when(model)
            if present or row.when is untied:
                names = (row.hf,) if isinstance(row.hf, str) else row.hf
                yield ours + row.megatron, tuple(theirs + name for name in names), row.transform if present else None


def shape(model: ModelConfig, vocab_size: Optional[int] = None) -> Shape:
    return Shape(model.num_attention_heads, num_query_groups(model), vocab_size)


# -- configs ----------------------------------------------------------------------------------------------------------
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
            norm_epsilon=c.rms_norm_eps, transformer_impl="local")  # the weight names written are the local layers'
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
        init_method_std=c.initializer_range, norm_epsilon=c.layer_norm_epsilon, transformer_impl="local")
