"""Patch-level training, the method (Shao, Meng, Zhou, ICLR 2025, arXiv 2407.12665).

A sequence of T*K tokens is read as T patches of K consecutive tokens:

* input: the embedding of a patch is the MEAN of its K token embeddings (no new parameters);
  the transformer runs on T patch positions;
* output: the hidden state at patch i predicts every token of patch i+1 with ONE softmax,
  loss_i = mean_k CE(logits_i, token_{(i+1)K+k}). Every patch position, the last one included, predicts
  (the dataset supplies the tokens of patch T as labels).

With K=1 both reduce exactly to next-token prediction. Tensors are sequence-first like megatron-core:
embeddings [s, b, h], logits [T, b, V] (V possibly a tensor-parallel shard of the vocabulary),
labels [b, T*K] with labels[:, i*K + k] = token (i+1)*K + k of the sample.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def patchify(embeddings: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[T*K, b, h] token embeddings -> [T, b, h] patch embeddings: the mean of each K consecutive tokens."""
    seq_length, batch, hidden = embeddings.shape
    if seq_length % patch_size:
        raise ValueError(f"sequence length {seq_length} is not a multiple of patch size {patch_size}")
    return embeddings.view(seq_length // patch_size, patch_size, batch, hidden).mean(dim=1)


def patch_position_ids(seq_length: int, patch_size: int, device=None) -> torch.Tensor:
    """Position of every token = index of its patch, so learned absolute positions average to the patch's
    position (RoPE needs no ids: it runs over the T patch positions of the decoder input)."""
    return (torch.arange(seq_length, device=device) // patch_size).unsqueeze(0)


class _PatchCrossEntropy(torch.autograd.Function):
    """Per-target cross-entropy of K targets sharing ONE softmax, over a vocabulary that may be split
    across a tensor-parallel group.

    logits [T, b, V_local], targets [T, b, K] (global vocabulary ids) -> loss [T, b, K] with
    loss[..., k] = logsumexp(logits) - logit[target_k]. The logsumexp is computed once per position (max and
    sum of exponentials all-reduced over the group); each target logit comes from the rank owning it.
    Backward: d/dlogits = softmax * sum_k g_k - sum_k g_k * onehot(target_k); K copies of the
    log-probabilities are never materialised.
    """

    @staticmethod
    def forward(ctx, logits, targets, group, vocab_size):
        world = dist.get_world_size(group) if group is not None else 1
        rank = dist.get_rank(group) if group is not None else 0
        vocab_local = logits.size(-1)
        # Rows past the tokenizer's vocabulary (padding for tensor parallelism) are no token: not in the softmax.
        real_local = vocab_local if vocab_size is None else min(max(vocab_size - rank * vocab_local, 0), vocab_local)

        if real_local:
            logits_max = logits[..., :real_local].max(dim=-1).values
        else:
            logits_max = logits.new_full(logits.shape[:-1], float("-inf"))
        if world > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)
        shifted[..., real_local:] = float("-inf")

        local_targets = targets - rank * vocab_local
        owned = (local_targets >= 0) & (local_targets < vocab_local)
        local_targets = local_targets.clamp(0, vocab_local - 1)
        target_logits = torch.gather(shifted, -1, local_targets) * owned

        exp_logits = shifted.exp_()
        sum_exp = exp_logits.sum(dim=-1)
        if world > 1:
            dist.all_reduce(target_logits, group=group)
            dist.all_reduce(sum_exp, group=group)

        loss = torch.log(sum_exp).unsqueeze(-1) - target_logits
        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_targets, owned)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_targets, owned = ctx.saved_tensors
        grad_logits = softmax * grad_loss.sum(dim=-1, keepdim=True)
        grad_logits.scatter_add_(-1, local_targets, -(grad_loss * owned))
        return grad_logits, None, None, None


def patch_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, patch_size: int, group: Optional[dist.ProcessGroup] = None,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """The K-target loss per label token.

    logits [T, b, V_local] (sequence-first, as megatron-core's output layer gives them), labels [b, T*K].
    Returns [b, T*K]: entry (i*K + k) = -log softmax(logits_i)[labels_{i*K+k}], the same shape and meaning
    as megatron-core's per-token LM loss, so the usual masked mean over the loss mask gives
    mean over positions and k of CE(logits_i, token_{(i+1)K+k}) with pad tokens left out.
    """
    num_patches, batch, _ = logits.shape
    if labels.shape != (batch, num_patches * patch_size):
        raise ValueError(
            f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)} with patch size {patch_size}"
        )
    targets = labels.view(batch, num_patches, patch_size).transpose(0, 1)  # [T, b, K]
    # bf16/fp16 logits are upcast: the softmax and its gradient are computed in (at least) fp32.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss = _PatchCrossEntropy.apply(logits, targets.contiguous(), group, vocab_size)
    return loss.transpose(0, 1).reshape(batch, num_patches * patch_size)
