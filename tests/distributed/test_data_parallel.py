"""Data parallelism (torchrun, gloo): DP=2 gives the losses of one process on the same global batch."""

import pytest

from helpers import assert_same_run, launcher, phase_flags, run, train_losses


@pytest.mark.parametrize("k", [1, 4])
def test_dp2_matches_single_process(corpus, tmp_path, one_process, k):
    assert_same_run(one_process(k), train_losses(corpus, tmp_path, k, 2))


def test_ranks_building_one_cache_together_get_the_samples_of_one_process(corpus, tmp_path):
    """A weighted blend built with an empty --data-cache-path by two ranks at once (rank 0 writes the index files,
    the other reads them) and by one process with a cache of its own: the same samples everywhere."""
    def digests(nproc, out):
        out.mkdir()
        flags = phase_flags(corpus, out, 1, ["--data-path", "0.7", corpus["aligned4"], "0.3", corpus["plain"]])
        run([*launcher(nproc), "tests/distributed/dataset_worker.py", str(out), *flags])
        return {(out / f"rank{r}.txt").read_text() for r in range(nproc)}

    together, alone = digests(2, tmp_path / "two"), digests(1, tmp_path / "one")
    assert len(together) == 1 and together == alone
