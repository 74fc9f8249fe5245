"""tools/preprocess_data.py under mpirun: N ranks write exactly what one process writes, and a rank that fails
fails them all without touching the output."""

import gzip
import json
import os
import shutil

import pytest

from helpers import PYTHON, run
from megatron_patch.data.corpus import split_inputs

MPIRUN = shutil.which("mpirun")
pytestmark = pytest.mark.skipif(MPIRUN is None, reason="mpirun not found (scripts/setup_cpu.sh installs Open MPI)")
SUFFIXES = (".bin", ".idx", ".meta.json")


def preprocess(corpus, inputs, prefix, *extra, ranks=1, check=True):
    launcher = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-np", str(ranks)] if ranks > 1 else []
    return run([*launcher, PYTHON, "tools/preprocess_data.py", "--input", *map(str, inputs), "--tokenizer-model",
                corpus["tokenizer"], "--append-eod", "--output-prefix", str(prefix), "--log-interval", "0", *extra],
               check=check)


def contents(prefix):
    return [open(f"{prefix}_text_document{suffix}", "rb").read() for suffix in SUFFIXES]


def _inputs(corpus, tmp_path, bad_lines):
    """A JSONL file big enough to be cut between ranks (with malformed lines at `bad_lines`), then a gzipped
    JSONL and a text file (each read whole by one rank)."""
    lines = [json.dumps({"text": text}) + "\n" for text in corpus["texts"]]
    with gzip.open(tmp_path / "small.jsonl.gz", "wt") as f:
        f.writelines(lines[:20])
    for number in bad_lines:
        lines.insert(number - 1, '{"text": not json}\n')
    big = tmp_path / "big.jsonl"
    big.write_text("".join(lines))
    (tmp_path / "notes.txt").write_text("".join(" ".join(t.split()[:50]) + "\n" for t in corpus["texts"][:10]))
    return [big, tmp_path / "small.jsonl.gz", tmp_path / "notes.txt"]


@pytest.mark.parametrize("ranks,workers", [(2, 2), (3, 1)])
def test_ranks_write_what_one_process_writes(corpus, tmp_path, ranks, workers):
    inputs = _inputs(corpus, tmp_path, bad_lines=[10, 150])
    last_share = split_inputs(list(map(str, inputs)), ranks)[-1][0]
    line_150_offset = len(b"".join(inputs[0].read_bytes().splitlines(keepends=True)[:149]))
    assert last_share.path == str(inputs[0]) and 0 < last_share.start <= line_150_offset  # a cut file
    single = preprocess(corpus, inputs, tmp_path / "single")
    sharded = preprocess(corpus, inputs, tmp_path / "sharded", "--workers", str(workers), ranks=ranks)
    assert contents(tmp_path / "sharded") == contents(tmp_path / "single")  # .bin, .idx and the sidecar
    for result in (single, sharded):
        # Line 150 lies in the last rank's share, which starts inside big.jsonl: still reported as line 150.
        assert f"{inputs[0]}:10: skipped" in result.stderr and f"{inputs[0]}:150: skipped" in result.stderr
        assert "190 documents" in result.stdout and "2 skipped lines" in result.stdout
    assert f"{ranks} rank(s) x {workers} worker(s)" in sharded.stdout
    assert sorted(os.listdir(tmp_path)) == sorted([p.name for p in inputs] + [
        f"{run_name}_text_document{suffix}" for run_name in ("single", "sharded") for suffix in SUFFIXES])


def test_a_failing_rank_fails_every_rank_and_keeps_the_earlier_output(corpus, tmp_path):
    inputs = _inputs(corpus, tmp_path, bad_lines=[150])  # only in the last rank's share
    preprocess(corpus, inputs[1:], tmp_path / "out")
    before = contents(tmp_path / "out")
    result = preprocess(corpus, inputs, tmp_path / "out", "--strict", "--workers", "2", ranks=2, check=False)
    assert result.returncode != 0
    assert f"error: {inputs[0]}:150: skipped: malformed JSON" in result.stderr and "Traceback" not in result.stderr
    assert contents(tmp_path / "out") == before
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]


def test_srun_tasks_that_mpi_does_not_connect_are_refused(corpus, tmp_path):
    """srun without an MPI plugin starts N independent copies: each would write the whole output."""
    result = run([PYTHON, "tools/preprocess_data.py", "--input", str(corpus["jsonl"]), "--tokenizer-model",
                  corpus["tokenizer"], "--output-prefix", str(tmp_path / "out")], check=False,
                 env={"SLURM_STEP_NUM_TASKS": "2"})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "srun started 2 tasks but MPI connects none of them: launch with srun --mpi=pmix" in result.stderr
    assert not os.listdir(tmp_path)
