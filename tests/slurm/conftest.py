"""The Slurm tests' fixture: a real two-node Slurm on localhost (slurm_harness.py), once per session."""

import pytest

from slurm_harness import running_cluster


@pytest.fixture(scope="session")
def slurm_cluster():
    with running_cluster() as cluster:
        yield cluster
