"""PatchGPTModel: megatron-core's GPTModel reading patches and predicting the next patch (and PatchHybridModel:
the same on megatron-core's HybridModel, `--model-class hybrid`).

Only two things differ from GPTModel, both from `patching.py`: the decoder input is the mean of each K token
embeddings, and the loss is the K-target cross-entropy. The parameters are exactly GPTModel's for every K,
so phase-1 (K>1) weights load into the phase-2 (K=1) model as they are, and K=1 is GPTModel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_patch.compat.cpu import pipeline_p2p_settings
from megatron_patch.compat.megatron_core import hybrid_api
from megatron_patch.config.schema import Fp8Config, ModelConfig, ParallelConfig
from megatron_patch.method.attention import SDPAttention
from megatron_patch.method.patching import patch_cross_entropy, patch_position_ids, patchify


class PatchLanguageModel:
    """The two hooks, for any megatron-core language model that takes `decoder_input` in forward() and computes
    its loss in compute_language_model_loss(): GPTModel and HybridModel."""

    def __init__(self, *args, patch_size: int = 1, tokenizer_vocab_size: int | None = None, **kwargs):
        # Patches are averaged over the full sequence, so the embedding must not scatter it for sequence
        # parallelism; forward() scatters the patch embeddings instead.
        super().__init__(*args, scatter_embedding_sequence_parallel=False, **kwargs)
        self.patch_size = patch_size
        self.tokenizer_vocab_size = tokenizer_vocab_size  # the softmax covers these rows, not the TP padding

    def forward(self, input_ids, position_ids, attention_mask, labels=None, **kwargs):
        """input_ids/labels: [b, T*K] tokens; position_ids: ignored (patch indices are used);
        attention_mask: causal mask over the T patch positions (None: built here)."""
        seq_length = input_ids.size(1)
        decoder_input = None
        if self.pre_process:
            positions = patch_position_ids(seq_length, self.patch_size, device=input_ids.device)
            decoder_input = patchify(self.embedding(input_ids=input_ids, position_ids=positions), self.patch_size)
            if self.config.sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        if attention_mask is None:
            attention_mask = causal_attention_mask(seq_length // self.patch_size, input_ids.device)
        return super().forward(
            input_ids, None, attention_mask, decoder_input=decoder_input, labels=labels, **kwargs
        )

    def compute_language_model_loss(self, labels, logits):
        """[b, T*K] per-token loss of the K-target objective (GPTModel's hook for the LM loss)."""
        return patch_cross_entropy(
            logits, labels, self.patch_size, group=parallel_state.get_tensor_model_parallel_group(),
            vocab_size=self.tokenizer_vocab_size,
        )


class PatchGPTModel(PatchLanguageModel, GPTModel):
    pass


HYBRID = hybrid_api()


class PatchHybridModel(PatchLanguageModel, HYBRID.model):
    pass


class TorchNormHybridStack(HYBRID.stack):
    """megatron-core's hybrid stack with its final norm from torch (TorchNorm): megatron-core builds it from
    Transformer Engine whatever the layers are."""

    def __init__(self, config: TransformerConfig, *args, post_layer_norm: bool = True, **kwargs):
        super().__init__(config, *args, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = TorchNorm(config, config.hidden_size, eps=config.layernorm_epsilon)


class TorchNorm:
    """torch LayerNorm / RMSNorm for megatron-core layer specs, also under sequence parallelism (megatron-core's
    own torch fallback refuses it): each tensor-parallel rank then normalises its part of the sequence, and the
    `sequence_parallel` mark makes finalize_model_grads all-reduce the norm's gradients over the group."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        norm = norm_cls(hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def layer_specs(model: ModelConfig, config: TransformerConfig, vp_stage: int | None) -> TransformerBlockSubmodules:
    """The GPT layers of this model chunk. Local implementation: megatron-core's local spec, its core attention
    SDPAttention unless --attention-backend unfused/local, the torch norms replaced by TorchNorm unless apex provides
    fused ones. Transformer Engine: megatron-core's TE spec as it is (TE's attention chooses its kernel from
    config.attention_backend)."""
    if model.transformer_impl == "transformer_engine":
        # Optional GPU package (config/schema.py refuses this implementation without it): imported only when asked for.
        from megatron.core.extensions.transformer_engine import TENorm

        spec, norm = get_gpt_layer_with_transformer_engine_spec(), TENorm
    else:
        spec, norm = local_layer_spec(model)
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config, vp_stage), layer_norm=norm)


def local_layer_spec(model: ModelConfig) -> tuple[ModuleSpec, type]:
    """megatron-core's local GPT layer, SDPAttention as its core attention, TorchNorm unless apex provides fused
    norms; and the norm class."""
    spec = get_gpt_layer_local_spec(normalization=model.normalization)
    if model.uses_sdpa:
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    norm = spec.submodules.input_layernorm
    if norm is WrappedTorchNorm:
        norm = TorchNorm
        spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = norm
    return spec, norm


def hybrid_stack_spec(model: ModelConfig) -> ModuleSpec:
    """The hybrid model's layers. Local: the halves of the local GPT layer, an attention layer ("*": norm,
    attention, residual) and an MLP layer ("-": norm, MLP, residual), so "*-" * n has the weights of an n-layer
    GPT. Transformer Engine: megatron-core's own hybrid spec (Mamba, MoE, ... layers too)."""
    if model.transformer_impl == "transformer_engine":
        # Optional GPU packages (config/schema.py refuses this implementation without them).
        try:
            from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec as spec
        except ImportError:
            from megatron.core.models.mamba.mamba_layer_specs import mamba_stack_spec as spec
        return spec
    gpt, norm = local_layer_spec(model)
    layers = gpt.submodules
    attention = TransformerLayerSubmodules(input_layernorm=norm, self_attention=layers.self_attention,
                                           self_attn_bda=layers.self_attn_bda)
    mlp = TransformerLayerSubmodules(pre_mlp_layernorm=norm, mlp=layers.mlp, mlp_bda=layers.mlp_bda)
    return ModuleSpec(module=TorchNormHybridStack, submodules=HYBRID.submodules(
        attention_layer=ModuleSpec(module=TransformerLayer, submodules=attention),
        mlp_layer=ModuleSpec(module=MLPLayer, submodules=mlp)))


def causal_attention_mask(num_positions: int, device) -> torch.Tensor:
    """[1, 1, T, T] boolean mask, True = masked (megatron-core's convention)."""
    return torch.triu(torch.ones(num_positions, num_positions, dtype=torch.bool, device=device), 1)[None, None]


def transformer_config(model: ModelConfig, parallel: ParallelConfig, bf16: bool = False,
                       fp16: bool = False, fp8: Fp8Config | None = None) -> TransformerConfig:
    dtype = torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
    fp8 = fp8 or Fp8Config()
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        layernorm_zero_centered_gamma=model.apply_layernorm_1p,
        gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else F.gelu,
        add_bias_linear=model.add_bias_linear,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        num_query_groups=model.query_groups if model.group_query_attention else None,
        transformer_impl=model.transformer_impl or "local",
        # Only Transformer Engine reads it (megatron-core sets TE's NVTE_* kernel switches from it); the local
        # layers' choice is made in layer_specs.
        attention_backend=AttnBackend[model.attention_backend] if model.transformer_impl == "transformer_engine"
        else AttnBackend.auto,
        recompute_granularity=model.recompute_granularity,
        recompute_method=model.recompute_method,
        recompute_num_layers=model.recompute_num_layers,
        recompute_modules=list(model.recompute_modules) if model.recompute_modules else None,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        fp16=fp16,
        # Transformer Engine's fp8 GEMMs: megatron-core wraps its TransformerBlock (not the embedding's mean of K,
        # the output layer or the loss) in fp8 autocast, and builds the weights in fp8 with fp8_param.
        fp8=fp8.format,
        fp8_recipe=fp8.recipe,
        fp8_margin=fp8.margin,
        fp8_amax_history_len=fp8.amax_history_len,
        fp8_amax_compute_algo=fp8.amax_compute_algo,
        fp8_wgrad=fp8.wgrad,
        fp8_param=fp8.param_gather,
        first_last_layers_bf16=fp8.first_last_layers_bf16,
        num_layers_at_start_in_bf16=fp8.num_layers_at_start_in_bf16,
        num_layers_at_end_in_bf16=fp8.num_layers_at_end_in_bf16,
        # Same initial weights on any device and any tensor-parallel size.
        use_cpu_initialization=True,
        **pipeline_p2p_settings(),
    )


def build_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    vocab_size: int,
    patch_size: int,
    bf16: bool = False,
    vp_stage: int | None = None,
    config: TransformerConfig | None = None,
    tokenizer_vocab_size: int | None = None,
) -> PatchLanguageModel:
    """The model chunk this rank holds (the whole model without pipeline parallelism; chunk `vp_stage` of this
    pipeline stage with interleaving). Chunks of one rank must share one `config`: megatron-core's schedules
    read their settings (no_sync_func, finalize_model_grads_func) from the first chunk's. `vocab_size`: the
    embedding's rows (padded for TP); `tokenizer_vocab_size`: the real ones, over which the loss normalises (the
    probabilities an exported HF model, which has no padding rows, gives)."""
    config = config or transformer_config(model, parallel, bf16)
    if model.model_class == "hybrid":
        model_class, layers = PatchHybridModel, {HYBRID.spec_arg: hybrid_stack_spec(model),
                                                 HYBRID.pattern_arg: model.hybrid_layer_pattern}
    else:
        model_class, layers = PatchGPTModel, {"transformer_layer_spec": layer_specs(model, config, vp_stage),
                                              "vp_stage": vp_stage}
    return model_class(
        config=config,
        **layers,
        vocab_size=vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type=model.position_embedding_type,
        rotary_base=model.rotary_base,
        patch_size=patch_size,
        tokenizer_vocab_size=tokenizer_vocab_size,
    )
