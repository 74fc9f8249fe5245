"""Core attention on torch's `scaled_dot_product_attention` for megatron-core's layer specs.

megatron-core's local `DotProductAttention` materialises the [b, heads, s, s] scores, their softmax and the dropout
mask, and keeps them for backward (O(s^2) memory per layer). `SDPAttention` is a drop-in replacement (same
constructor and forward contract, no parameters, so checkpoints are the same) that calls torch's fused kernels:
FlashAttention-2 or memory-efficient attention on CUDA, the flash kernel on CPU; none keeps the scores.

  inputs   query [s, b, heads_per_partition, head_dim], key/value [s, b, groups_per_partition, head_dim]
  mask     megatron-core's boolean mask, True = masked; the plain causal mask (what PatchGPTModel passes) and a
           missing mask with a causal layer both run as `is_causal=True`, any other mask explicitly
  output   [s, b, heads_per_partition * head_dim]

Attention dropout is applied only in training mode, inside megatron-core's tensor-parallel RNG tracker fork (as
`DotProductAttention` does: each tensor-parallel rank drops different heads), not forked under sequence
parallelism, also as `DotProductAttention`. Grouped-query attention repeats each key/value group for its query
heads (`enable_gqa` is not used: the memory-efficient kernel refuses it and torch would fall back to the math
kernel, which keeps the scores).
"""

from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide


class PlainCausalMasks:
    """Whether a boolean mask is the plain causal one (True above the diagonal), remembering the last mask seen:
    the model passes one mask object to every layer, so it is compared once per forward pass."""

    def __init__(self):
        self.last = None  # (weak reference to a mask, whether it is the plain causal mask)

    BLOCK = 1 << 20  # mask elements compared at a time: no [s, s] temporary (the point of SDPA is not to have one)

    def __call__(self, mask: torch.Tensor, sq: int, sk: int) -> bool:
        if self.last is not None and self.last[0]() is mask:
            return self.last[1]
        plain = (mask.dtype == torch.bool and sq == sk and mask.numel() == sq * sk and mask.shape[-2:] == (sq, sk)
                 and not self.differs_from_causal(mask.reshape(sq, sk)))
        self.last = (weakref.ref(mask), plain)
        return plain

    def differs_from_causal(self, mask: torch.Tensor) -> bool:
        """Any element of the [s, s] mask other than `column > row`, compared in row blocks (one device sync)."""
        rows = torch.arange(mask.size(0), device=mask.device)[:, None]
        columns = torch.arange(mask.size(1), device=mask.device)[None, :]
        step = max(1, self.BLOCK // mask.size(1))
        differs = torch.zeros((), dtype=torch.bool, device=mask.device)
        for start in range(0, mask.size(0), step):
            differs |= (mask[start:start + step] != (columns > rows[start:start + step])).any()
        return bool(differs)


is_plain_causal = PlainCausalMasks()


class SDPAttention(MegatronModule):
    """megatron-core's `DotProductAttention` contract on `torch.nn.functional.scaled_dot_product_attention`."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention: context parallelism needs Transformer Engine's attention")
        if config.softmax_type != "vanilla":
            raise ValueError(f"SDPAttention: softmax_type {config.softmax_type!r} is not supported (vanilla only)")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            raise ValueError("SDPAttention: sliding-window attention is not supported")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        world_size = pg_collection.tp.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, world_size)
        self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, world_size)
        self.num_query_groups_per_partition = divide(config.num_query_groups, world_size)
        # DotProductAttention divides its scale by the layer number with apply_query_key_layer_scaling and its
        # softmax multiplies it back: the product is this.
        self.softmax_scale = 1.0 / math.sqrt(self.hidden_size_per_attention_head) if softmax_scale is None \
            else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        assert packed_seq_params is None, "SDPAttention does not take packed sequences (Transformer Engine does)"
        assert attention_bias is None, "SDPAttention does not take an attention bias"
        sq, b = query.shape[:2]
        sk = key.size(0)
        repeats = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if repeats > 1:  # [sk, b, groups, hn] -> [sk, b, heads, hn]: each group serves `repeats` query heads
            key = key.repeat_interleave(repeats, dim=2)
            value = value.repeat_interleave(repeats, dim=2)
        # [s, b, n, hn] -> [b, n, s, hn]: views, the last dimension stays contiguous as the kernels need.
        query, key, value = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask, is_causal = None, False
        if attention_mask is None:
            is_causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal and sq > 1
        elif is_plain_causal(attention_mask, sq, sk):
            is_causal = True
        else:
            mask = ~attention_mask  # torch's boolean masks say where to attend
        dropout_p = self.dropout_p if self.training else 0.0

        def attend():
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=self.softmax_scale)

        if dropout_p > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend()
        else:
            context = attend()
        # [b, n, sq, hn] -> [sq, b, n * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
