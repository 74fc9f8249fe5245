"""Pipeline parallelism (1F1B and interleaved virtual stages, alone and with TP) against one process.

Fresh pipeline stages initialise their layers differently from one process, so every run starts from the same
checkpoint, resharded into its layout by --pretrained-checkpoint (which is also the phase hand-off path)."""

import pytest

from helpers import LAYOUTS, assert_same_run, train_losses

PIPELINED = ["pp2", "pp2_vpp2", "tp2_pp2"]


@pytest.mark.parametrize("layout", PIPELINED)
@pytest.mark.parametrize("k", [1, 4])
def test_pipeline_layout_matches_single_process(corpus, tmp_path, start_checkpoint, one_process, layout, k):
    nproc, flags = LAYOUTS[layout]
    common = ["--num-layers", "4", "--pretrained-checkpoint", start_checkpoint, "--micro-batch-size", "1"]
    assert_same_run(one_process(k, common), train_losses(corpus, tmp_path, k, nproc, common + flags))
