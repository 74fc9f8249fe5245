"""Tensor parallelism (megatron-core column/row-parallel layers, vocab-parallel embedding and output, and the
fused vocab-parallel K-target loss) against one process."""

import pytest

from conftest import PYTHON, ROOT, assert_same_run, free_port, run, train_losses


@pytest.mark.parametrize("k", [1, 4])
def test_tp2_matches_single_process(corpus, tmp_path, k):
    # use_cpu_initialization gives TP=2 the same initial weights as TP=1.
    assert_same_run(train_losses(corpus, tmp_path, k, 1),
                    train_losses(corpus, tmp_path, k, 2, ["--tensor-model-parallel-size", "2"]))


def test_fused_vocab_parallel_loss_matches_unfused_reference():
    result = run([PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                  f"{ROOT}/tests/distributed/fused_loss_worker.py"], env={"PYTHONPATH": ROOT})
    assert result.stdout.count("FUSED OK") == 2
