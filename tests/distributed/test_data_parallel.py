"""Data parallelism (torchrun, gloo): DP=2 gives the losses of one process on the same global batch."""

import pytest

from conftest import assert_same_run, train_losses


@pytest.mark.parametrize("k", [1, 4])
def test_dp2_matches_single_process(corpus, tmp_path, k):
    assert_same_run(train_losses(corpus, tmp_path, k, 1), train_losses(corpus, tmp_path, k, 2))
