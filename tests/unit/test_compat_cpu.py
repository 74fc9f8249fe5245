"""Each CPU shim is needed (megatron-core fails without it) and none is applied when CUDA is present."""

import tempfile

import pytest

from helpers import PYTHON, ROOT, launcher, run
from megatron_patch.compat.cpu import _SHIMS, NEEDED_FROM, SKIP_ENV
from megatron_patch.compat.megatron_core import installed_version

# One optimizer step of a tiny 2-stage pipeline (tied embeddings, RoPE, dropout) through megatron-core's DDP,
# Adam with clipping, and its 1F1B schedule, on two processes; then a torch_dist checkpoint of it.
PROBE = """
from megatron_patch.distributed import parallel
from megatron_patch.config.schema import ModelConfig, ParallelConfig
from megatron_patch.method.model import build_model
import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
import os
from megatron.core import dist_checkpointing


def main():
    layout = ParallelConfig(pipeline_model_parallel_size=2)
    parallel.initialize(layout, seed=1)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=2, max_position_embeddings=16,
                      position_embedding_type="rope", hidden_dropout=0.1, attention_dropout=0.1)
    model = build_model(cfg, layout, 64, patch_size=2)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    opt = get_megatron_optimizer(OptimizerConfig(lr=1e-3, min_lr=0.0, clip_grad=1e-3), [ddp])
    tokens = torch.randint(0, 64, (2, 16))
    def step(data, model):
        loss = model(tokens, None, None, labels=tokens)
        return loss, lambda out: (out.sum(), torch.tensor(out.numel()), {})
    get_forward_backward_func()(forward_step_func=step, data_iterator=None, model=[ddp], num_microbatches=1,
                                seq_length=8, micro_batch_size=2)
    ddp.finish_grad_sync()  # what the trainer's finalize_model_grads does: the data-parallel gradient reduction
    opt.step()
    # A torch_dist checkpoint of the model (its writer synchronises CUDA first).
    dist_checkpointing.save(model.sharded_state_dict(), os.environ["PROBE_CHECKPOINT"])
    print("PROBE OK")


if __name__ == "__main__":  # dist_checkpointing's writer starts processes that import this module
    main()
"""


def _probe(skip=""):
    with tempfile.NamedTemporaryFile("w", suffix=".py") as script, tempfile.TemporaryDirectory() as checkpoint:
        script.write(PROBE)
        script.flush()
        return run([*launcher(2), script.name], check=False,
                   env={SKIP_ENV: skip, "PYTHONPATH": ROOT, "PROBE_CHECKPOINT": checkpoint}, timeout=300)


def test_megatron_core_trains_on_cpu_with_the_shims():
    result = _probe()
    assert result.returncode == 0 and result.stdout.count("PROBE OK") == 2, result.stderr[-3000:]


@pytest.mark.parametrize("shim", sorted(_SHIMS))
def test_each_shim_is_needed(shim):
    if installed_version() < NEEDED_FROM.get(shim, (0, 0)):
        pytest.skip(f"needed from megatron-core {'.'.join(map(str, NEEDED_FROM[shim]))} on (the 3.12 test leg)")
    result = _probe(skip=shim)
    assert result.returncode != 0, f"megatron-core trained without the {shim} shim: remove it"
    assert "cuda" in result.stderr.lower() or "CUDA" in result.stderr, result.stderr[-3000:]


def test_no_shim_is_applied_when_cuda_is_available():
    code = (
        "import torch; torch.cuda.is_available = lambda: True\n"
        "zeros, current_device, tensor_type, to_cuda = (torch.zeros, torch.cuda.current_device, torch.Tensor.type,\n"
        "                                            torch.Tensor.cuda)\n"
        "from megatron_patch.compat.cpu import apply_cpu_shims\n"
        "from megatron.core.tensor_parallel import random\n"
        "tracker = random.CudaRNGStatesTracker\n"
        "assert apply_cpu_shims() == []\n"
        "assert torch.zeros is zeros and torch.cuda.current_device is current_device\n"
        "assert torch.Tensor.type is tensor_type and random.CudaRNGStatesTracker is tracker\n"
        "assert torch.Tensor.cuda is to_cuda\n"
        "print('UNTOUCHED')\n"
    )
    assert "UNTOUCHED" in run([PYTHON, "-c", code]).stdout
