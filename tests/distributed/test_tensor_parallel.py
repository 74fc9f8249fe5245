"""Tensor parallelism (megatron-core column/row-parallel layers, vocab-parallel embedding and output, and the
fused vocab-parallel K-target loss) against one process."""

import pytest

from helpers import ROOT, TORCHRUN, assert_same_run, run, train_losses


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
@pytest.mark.parametrize("k", [1, 4])
def test_tp2_matches_single_process(corpus, tmp_path, k, sequence_parallel):
    # use_cpu_initialization gives TP=2 the same initial weights as TP=1.
    flags = ["--tensor-model-parallel-size", "2"] + (["--sequence-parallel"] if sequence_parallel else [])
    assert_same_run(train_losses(corpus, tmp_path, k, 1), train_losses(corpus, tmp_path, k, 2, flags))


def test_fused_vocab_parallel_loss_matches_unfused_reference():
    result = run([*TORCHRUN, "--nproc-per-node", "2",
                  f"{ROOT}/tests/distributed/fused_loss_worker.py"], env={"PYTHONPATH": ROOT})
    assert result.stdout.count("FUSED OK") == 2
