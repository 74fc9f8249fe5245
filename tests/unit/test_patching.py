"""The method itself: patchify and the K-target loss against their definitions."""

import pytest
import torch
import torch.nn.functional as F

from megatron_patch.method.patching import patch_cross_entropy, patch_position_ids, patchify


def test_patchify_is_the_mean_of_each_group_of_k_embeddings():
    torch.manual_seed(0)
    for k in (1, 2, 4, 8):
        emb = torch.randn(8 * 3, 2, 5)  # [T*K, b, h] with T*K = 24
        if 24 % k:
            continue
        expected = torch.stack([emb[i * k:(i + 1) * k].sum(0) / k for i in range(24 // k)])
        torch.testing.assert_close(patchify(emb, k), expected, rtol=0, atol=1e-6)


def test_patchify_rejects_partial_patches():
    with pytest.raises(ValueError, match="not a multiple of patch size 4"):
        patchify(torch.zeros(10, 1, 3), 4)


def test_patch_position_ids_are_patch_indices():
    assert patch_position_ids(8, 4).tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]


def reference_patch_loss(logits, labels, loss_mask, k):
    """The paper's formula, written out: mean over unmasked (i, k) of -log softmax(logits_i)[target_{i,k}]."""
    T, b, _ = logits.shape
    log_probs = F.log_softmax(logits.float(), dim=-1)
    total, count = 0.0, 0.0
    for batch in range(b):
        for i in range(T):
            for j in range(k):
                m = loss_mask[batch, i * k + j]
                total = total + m * -log_probs[i, batch, labels[batch, i * k + j]]
                count = count + m
    return total / count


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("with_padding", [False, True])
def test_patch_loss_matches_reference_formula(k, with_padding):
    torch.manual_seed(k)
    T, b, V = 6, 3, 50
    logits = torch.randn(T, b, V, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (b, T * k))
    loss_mask = torch.ones(b, T * k, dtype=torch.float64)
    if with_padding:
        loss_mask[:, -(k // 2 + 1):] = 0  # pad at the end of the last patch, as after a document's EOD
        loss_mask[0, k:2 * k - 1] = 0
    ours = (patch_cross_entropy(logits, labels, k) * loss_mask).sum() / loss_mask.sum()
    (grad_ours,) = torch.autograd.grad(ours, logits)
    ref = reference_patch_loss(logits, labels, loss_mask, k)
    (grad_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_ours.double(), grad_ref, rtol=0, atol=1e-6)


def test_last_patch_prediction_is_used():
    """The output at the last patch position predicts the labels stored for it (the reference code drops it)."""
    torch.manual_seed(0)
    T, b, V, k = 4, 1, 20, 4
    logits = torch.randn(T, b, V, requires_grad=True)
    labels = torch.randint(0, V, (b, T * k))
    loss = patch_cross_entropy(logits, labels, k).mean()
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad[-1].abs().sum() > 0
    changed = labels.clone()
    changed[0, -k:] = (changed[0, -k:] + 1) % V
    assert patch_cross_entropy(logits, changed, k).mean() != loss


def test_k_targets_share_one_softmax_not_k_copies():
    """With all K labels equal, the K-target loss equals the single-target loss (one softmax per position)."""
    torch.manual_seed(0)
    T, b, V, k = 5, 2, 30, 4
    logits = torch.randn(T, b, V)
    single = torch.randint(0, V, (b, T))
    repeated = single.repeat_interleave(k, dim=1)
    per_token = patch_cross_entropy(logits, repeated, k).view(b, T, k)
    expected = F.cross_entropy(logits.permute(1, 2, 0), single, reduction="none")  # [b, T]
    torch.testing.assert_close(per_token, expected.unsqueeze(-1).expand(b, T, k), rtol=0, atol=1e-5)


def test_label_shape_is_checked():
    with pytest.raises(ValueError, match="do not match"):
        patch_cross_entropy(torch.zeros(4, 2, 10), torch.zeros(2, 12, dtype=torch.long), 4)


@pytest.mark.parametrize("k", [1, 4])
def test_padding_rows_of_the_vocabulary_are_not_in_the_softmax(k):
    """Rows past the tokenizer's vocabulary (TP padding): the loss is the softmax over the real rows only, as an
    exported model without those rows computes it, and the padding rows get no gradient."""
    torch.manual_seed(0)
    T, b, real, padded = 5, 2, 20, 32
    logits = torch.randn(T, b, padded, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, real, (b, T * k))
    loss = patch_cross_entropy(logits, labels, k, vocab_size=real)
    loss.sum().backward()
    trimmed = logits.detach()[..., :real].clone().requires_grad_(True)
    expected = patch_cross_entropy(trimmed, labels, k)
    expected.sum().backward()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(logits.grad[..., :real], trimmed.grad, rtol=0, atol=1e-12)
    assert torch.count_nonzero(logits.grad[..., real:]) == 0
    assert not torch.allclose(patch_cross_entropy(logits.detach(), labels, k), loss.detach())  # padding mattered
