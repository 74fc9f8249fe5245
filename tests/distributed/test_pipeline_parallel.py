"""Pipeline parallelism (1F1B and interleaved virtual stages, alone and with TP) against one process.

Fresh pipeline stages initialise their layers differently from one process, so every run starts from the same
checkpoint, resharded into its layout by --pretrained-checkpoint (which is also the phase hand-off path)."""

import pytest

from conftest import assert_same_run, train_losses

LAYOUTS = {
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "pp2_vpp2": (2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]),
    "tp2_pp2": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("k", [1, 4])
def test_pipeline_layout_matches_single_process(corpus, tmp_path, start_checkpoint, layout, k):
    nproc, flags = LAYOUTS[layout]
    common = ["--num-layers", "4", "--pretrained-checkpoint", start_checkpoint, "--micro-batch-size", "1"]
    assert_same_run(train_losses(corpus, tmp_path, k, 1, common),
                    train_losses(corpus, tmp_path, k, nproc, common + flags))
