"""After one forward/backward over the same global batch, every layout holds the gradient of one process:
each parameter's full gradient (TP shards and pipeline stages reassembled) within 1e-5."""

import pytest
import torch

from helpers import LAYOUTS, ROOT, launcher, phase_flags, run
from megatron_patch.checkpoint import layout, reshard
from megatron_patch.config.presets import preset_model
from megatron_patch.config.schema import ParallelConfig
from megatron_patch.method.model import build_model


def full_gradients(corpus, out, k, nproc, flags, start, sharding):
    flags = phase_flags(corpus, out, k, ["--num-layers", "4", "--pretrained-checkpoint", start,
                                          "--micro-batch-size", "1", *flags])
    run([*launcher(nproc), f"{ROOT}/tests/distributed/grad_worker.py", str(out / "grads"), *flags],
        env={"PYTHONPATH": ROOT})
    return reshard.full_state_dict(layout.iteration_dir(str(out / "grads"), 1), sharding)


@pytest.fixture(scope="module")
def sharding(megatron_process):
    model = build_model(preset_model("tiny", num_layers=4, max_position_embeddings=32), ParallelConfig(), 1024, 4)
    return reshard.sharding_of(model)


@pytest.fixture(scope="module")
def reference(corpus, start_checkpoint, sharding, tmp_path_factory):
    """One process's gradients, per patch size (computed once)."""
    out = tmp_path_factory.mktemp("one_process")
    return {k: full_gradients(corpus, out / f"k{k}", k, 1, [], start_checkpoint, sharding) for k in (1, 4)}


# Every layout at K=4, the patch path (stage 0 averages embeddings, the last stage computes the K-target loss,
# vocab-parallel under TP). K=1 (megatron-core's own token path) only where no loss-parity test compares the
# layout's losses and grad norms step by step at K=1 (test_data/tensor/pipeline_parallel.py do for the others).
CASES = [(layout, 4) for layout in sorted(LAYOUTS)] + [("dp2_pp2_vpp2", 1)]


@pytest.mark.parametrize("layout,k", CASES)
def test_gradients_match_single_process(corpus, tmp_path, start_checkpoint, sharding, reference, layout, k):
    nproc, flags = LAYOUTS[layout]
    reference = reference[k]
    grads = full_gradients(corpus, tmp_path / layout, k, nproc, flags, start_checkpoint, sharding)
    assert grads.keys() == reference.keys() and len(grads) > 10
    for name, expected in reference.items():
        assert expected.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], expected, rtol=0, atol=1e-5 * max(1.0, expected.abs().max().item()),
                                   msg=name)
