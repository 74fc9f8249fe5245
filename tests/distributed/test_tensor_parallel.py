"""Tensor parallelism (megatron-core column/row-parallel layers, vocab-parallel embedding and output, and the
fused vocab-parallel K-target loss) against one process."""

import pytest

from helpers import ROOT, assert_same_run, launcher, run, train_losses


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
@pytest.mark.parametrize("k", [1, 4])
def test_tp2_matches_single_process(corpus, tmp_path, one_process, k, sequence_parallel):
    # use_cpu_initialization gives TP=2 the same initial weights as TP=1.
    flags = ["--tensor-model-parallel-size", "2"] + (["--sequence-parallel"] if sequence_parallel else [])
    assert_same_run(one_process(k), train_losses(corpus, tmp_path, k, 2, flags))


def test_fused_vocab_parallel_loss_matches_unfused_reference():
    result = run([*launcher(2), f"{ROOT}/tests/distributed/fused_loss_worker.py"], env={"PYTHONPATH": ROOT})
    assert result.stdout.count("FUSED OK") == 2


@pytest.mark.parametrize("k", [1, 4])
def test_hybrid_model_tp2_matches_single_process(corpus, tmp_path, one_process, k):
    hybrid = ["--hybrid-layer-pattern", "*-*-"]
    tp2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    assert_same_run(one_process(k, tuple(hybrid)), train_losses(corpus, tmp_path, k, 2, hybrid + tp2))
