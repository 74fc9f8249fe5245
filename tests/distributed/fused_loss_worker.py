"""Run by torchrun from test_tensor_parallel.py: the fused K-target loss on a vocabulary split across the
processes equals the unfused loss on the full logits, and at K=1 megatron-core's vocab_parallel_cross_entropy,
values and gradients."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megatron_patch.method.patching import patch_cross_entropy

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
for k in (1, 4):
    torch.manual_seed(k)
    T, b, V = 6, 3, 64
    full = torch.randn(T, b, V, dtype=torch.float64)
    labels = torch.randint(0, V, (b, T * k))
    mask = (torch.rand(b, T * k) > 0.2).double()
    shard = full.chunk(world, dim=-1)[rank].clone().requires_grad_()
    loss = (patch_cross_entropy(shard, labels, k, group=dist.group.WORLD) * mask).sum() / mask.sum()
    loss.backward()
    reference = full.clone().requires_grad_()
    log_probs = F.log_softmax(reference, -1)
    targets = labels.view(b, T, k).transpose(0, 1)
    ref = -(torch.gather(log_probs, -1, targets).transpose(0, 1).reshape(b, T * k) * mask).sum() / mask.sum()
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-9, (k, loss.item(), ref.item())
    torch.testing.assert_close(shard.grad, reference.grad.chunk(world, dim=-1)[rank], rtol=0, atol=1e-9)
# K=1 is megatron-core's vocab-parallel cross-entropy, value and gradient.
parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
full = torch.randn(5, 2, 64)  # fp32: megatron-core computes its loss in fp32
labels = torch.randint(0, 64, (2, 5))
ours_in = full.chunk(world, dim=-1)[rank].clone().requires_grad_()
theirs_in = ours_in.detach().clone().requires_grad_()
ours = patch_cross_entropy(ours_in, labels, 1, group=parallel_state.get_tensor_model_parallel_group())
theirs = vocab_parallel_cross_entropy(theirs_in, labels.t().contiguous()).t()
torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
ours.sum().backward()
theirs.sum().backward()
torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=0, atol=1e-6)
print("FUSED OK", rank)
dist.destroy_process_group()  # before exit: gloo threads alive at interpreter shutdown can abort it
