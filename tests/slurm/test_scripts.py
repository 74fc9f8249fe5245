"""The Slurm scripts (slurm/) on a real Slurm with two nodes: the chained two-phase plan, pre-emption (save,
requeue, resume), preprocessing over two nodes, settings checks and shellcheck."""

import os
import re
import subprocess
import time

import pytest

from helpers import PYTHON, ROOT, TINY
from megatron_patch.checkpoint import layout
from megatron_patch.training import json_log

SLURM_DIR = os.path.join(ROOT, "slurm")


def settings(corpus, out, **overrides):
    """The scripts' environment for the tiny model, one process per node, a plan of `TRAIN_ITERS` steps of 1024
    tokens of which 3/4 at patch level: phase 1 reads 8 samples of 128 tokens (32 patches of 4) per step, phase 2
    32 samples of 32 tokens."""
    return {
        "PYTHON": PYTHON, "OMP_NUM_THREADS": "1", "NPROC_PER_NODE": "1",
        "TOKENIZER_MODEL": corpus["tokenizer"], "DATA_PATH": corpus["aligned4"], "CKPT_DIR": str(out / "ckpt"),
        "PATCH_SIZE": "4", "PATCH_FRACTION": "0.75", "SEQ_LENGTH": "32", "GLOBAL_BATCH_SIZE": "32",
        "MICRO_BATCH_SIZE": "2",
        "MODEL_ARGS": " ".join(TINY), "OPTIMIZER_ARGS": "--lr 3e-3 --lr-warmup-iters 1",
        "EXTRA_ARGS": f"--data-cache-path {out / 'cache'} --eval-interval 1000 --eval-iters 1",
        # Slurm's PMIx plugin cannot serve two emulated nodes on one host (their step daemons cannot tell each
        # other apart); Open MPI's mpirun starts one rank per Slurm task instead (through srun).
        "MPI_LAUNCHER": "mpirun", "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        **overrides,
    }


def read_log_json(path):
    """(per-step records, phase summaries) of a --log-json file that may hold several runs of one phase."""
    records = json_log.read_records(path)
    return [r for r in records if "loss" in r], json_log.summaries(path)


def job_output(directory, name, job_id):
    return (directory / f"{name}-{job_id}.out").read_text()


def assert_completed(cluster, directory, name, job_id, restarts=0):
    state = cluster.wait_job(job_id)
    output = (directory / f"{name}-{job_id}.out")
    assert state == ("COMPLETED", "0:0", restarts), (state, output.read_text() if output.exists() else "no output")


@pytest.fixture(scope="module")
def two_phase_plan(slurm_cluster, corpus, tmp_path_factory):
    """slurm/submit_two_phase.sh run once: preprocessing, phase 1 and phase 2, each on both nodes."""
    out = tmp_path_factory.mktemp("plan")
    env = settings(corpus, out, DATA_PATH="", INPUT=str(corpus["jsonl"]), OUTPUT_PREFIX=str(out / "corpus"),
                   TRAIN_ITERS="40")
    started = time.time()
    submitted = slurm_cluster.command("bash", f"{SLURM_DIR}/submit_two_phase.sh", "--nodes=2", env=env, cwd=out)
    jobs = dict(re.findall(r"^(preprocess|phase \d): job (\d+)$", submitted.stdout, re.M))
    assert list(jobs) == ["preprocess", "phase 1", "phase 2"], submitted.stdout
    for step, name in [("preprocess", "preprocess"), ("phase 1", "phase1"), ("phase 2", "phase2")]:
        assert_completed(slurm_cluster, out, name, jobs[step])
    print(f"two-phase plan on Slurm: {time.time() - started:.0f} s")
    return {"dir": out, "jobs": jobs}


def test_two_phase_plan_runs_phase_2_from_phase_1_weights(two_phase_plan):
    out, jobs = two_phase_plan["dir"], two_phase_plan["jobs"]
    ckpt = out / "ckpt"
    phase1, phase2 = job_output(out, "phase1", jobs["phase 1"]), job_output(out, "phase2", jobs["phase 2"])
    # The plan: 30 of the 40 iterations at K=4, then 10 at K=1.
    for phase, output, patch_size, iters in [(1, phase1, 4, 30), (2, phase2, 1, 10)]:
        # One launcher per node, two trainer processes in all, each phase complete.
        assert "nodes n[1-2], 1 processes per node" in output and "world size 2" in output, output
        assert layout.latest_iteration(str(ckpt / f"phase{phase}")) == iters
        steps, summaries = read_log_json(ckpt / f"train.phase{phase}.jsonl")
        assert [s["iteration"] for s in steps] == list(range(1, iters + 1))
        assert [(s["patch_size"], s["iteration"], s["train_iters"]) for s in summaries] == [
            (patch_size, iters, iters)]
    assert f"initialised weights from {ckpt}/phase1 (iteration 30)" in phase2, phase2
    # Phase 2 starts where phase 1 left the model, not from a fresh one (loss ~ln(1000) = 6.9).
    first_loss = [read_log_json(ckpt / f"train.phase{p}.jsonl")[0][0]["loss"] for p in (1, 2)]
    assert first_loss[1] < first_loss[0] - 0.3, first_loss


def test_preprocessing_on_two_nodes_equals_one_process(two_phase_plan, corpus):
    """The chain's preprocessing, one MPI rank per node, each tokenizing its share: rank 0 reports both ranks, and
    the merged dataset has the same bytes as one process's (the corpus fixture's: same input, tokenizer,
    --append-eod --patch-size 4)."""
    out, jobs = two_phase_plan["dir"], two_phase_plan["jobs"]
    output = job_output(out, "preprocess", jobs["preprocess"])
    done = re.findall(r"^done: .*", output, re.M)
    assert "2 ranks on n[1-2]" in output and len(done) == 1 and "2 rank(s)" in done[0], output
    for suffix in (".bin", ".idx"):
        with open(f"{out}/corpus_text_document{suffix}", "rb") as two_ranks:
            with open(corpus["aligned4"] + suffix, "rb") as one_process:
                assert two_ranks.read() == one_process.read(), suffix


def test_preemption_signal_saves_requeues_and_completes(slurm_cluster, corpus, tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@300 sends before the time limit): the trainers stop after a
    step with a checkpoint, the job requeues itself, resumes with --load and ends at the planned iteration."""
    iters = 120  # phase 1 of a 160-iteration plan
    env = settings(corpus, tmp_path, TRAIN_ITERS="160")
    job = slurm_cluster.sbatch("--nodes=2", f"{SLURM_DIR}/phase.sbatch", "1", env=env, cwd=tmp_path)
    log_json = tmp_path / "ckpt" / "train.phase1.jsonl"
    deadline = time.time() + 120
    while not (log_json.exists() and len(read_log_json(log_json)[0]) >= 2):  # the trainers are in their loop
        assert time.time() < deadline and slurm_cluster.job_state(job)[0] in ("PENDING", "RUNNING"), \
            job_output(tmp_path, "phase", job)
        time.sleep(0.2)
    slurm_cluster.command("scancel", "--signal=USR1", "--batch", job)
    assert_completed(slurm_cluster, tmp_path, "phase", job, restarts=1)

    output = job_output(tmp_path, "phase", job)
    steps, summaries = read_log_json(log_json)
    stopped = summaries[0]["iteration"]
    assert [(s["iteration"], s["train_iters"]) for s in summaries] == [(stopped, iters), (iters, iters)]
    assert 2 <= stopped < iters
    assert "stopping after iteration" in output and f"requeueing job {job}" in output, output
    assert "restart 1, nodes n[1-2]" in output, output
    assert f"resumed from {tmp_path}/ckpt/phase1 at iteration {stopped}" in output, output
    # Each step exactly once: the second run went on from the checkpoint of the first.
    assert [s["iteration"] for s in steps] == list(range(1, iters + 1))
    assert layout.latest_iteration(str(tmp_path / "ckpt" / "phase1")) == iters


def run_script(script, *args, env):
    """A script run directly (no sbatch) with exactly `env` plus PATH."""
    return subprocess.run(["bash", f"{SLURM_DIR}/{script}", *args], capture_output=True, text=True, cwd=ROOT,
                          env={"PATH": os.environ["PATH"], **env})


TOKENIZER = "TOKENIZER_MODEL or VOCAB_FILE or VOCAB_SIZE"


@pytest.mark.parametrize("script, args, missing", [
    ("phase.sbatch", ["1"], f"DATA_PATH, {TOKENIZER}, CKPT_DIR, TRAIN_TOKENS or TRAIN_ITERS"),
    ("phase.sbatch", ["--check"], f"DATA_PATH, {TOKENIZER}, CKPT_DIR, TRAIN_TOKENS or TRAIN_ITERS"),
    ("preprocess.sbatch", [], f"INPUT, OUTPUT_PREFIX, {TOKENIZER}"),
    ("submit_two_phase.sh", [], f"DATA_PATH, {TOKENIZER}, CKPT_DIR, TRAIN_TOKENS or TRAIN_ITERS"),
])
def test_missing_settings_fail_before_any_work(script, args, missing):
    result = run_script(script, *args, env={})
    checked_by = "preprocess.sbatch" if script == "preprocess.sbatch" else "phase.sbatch"
    assert (result.returncode, result.stdout) == (2, "")  # for submit_two_phase.sh: nothing queued
    assert result.stderr == (f"{checked_by}: error: missing settings: {missing} (environment variables; see the "
                             "Slurm section of README.md)\n")


def test_submit_checks_the_plan_before_queueing_anything(corpus, tmp_path):
    # 30 samples per step cannot be split into phase 1's samples of K=4 times the length.
    result = run_script("submit_two_phase.sh",
                        env=settings(corpus, tmp_path, TRAIN_ITERS="40", GLOBAL_BATCH_SIZE="30"))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith("plan: error: a two-phase plan needs --global-batch-size"), result.stderr


def test_phase_script_outside_a_job_says_so():
    result = run_script("phase.sbatch", "1", env={"DATA_PATH": "data", "TOKENIZER_MODEL": "tok.model",
                                                  "CKPT_DIR": "ckpt", "TRAIN_ITERS": "4"})
    assert result.returncode == 2
    assert result.stderr == ("phase.sbatch: error: not inside a Slurm job: submit with sbatch (settings check only: "
                             "--check)\n")


FAKE_SRUN = """#!/usr/bin/env bash
# Stands in for the training step: the phase summary of a run that stopped early, then the exit status asked for.
echo '{"summary": {"iteration": 5, "train_iters": 10}}' >> "$CKPT_DIR/train.phase1.jsonl"
exit "$FAKE_STATUS"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1" in
  show) echo n1 ;;
  *) echo "$*" >> "$CKPT_DIR/scontrol.log" ;;
esac
"""


@pytest.mark.parametrize("status, restarts, requeued, message", [
    (0, 1, True, "requeueing job 77 (restart 2 of at most 3)"),
    (0, 3, False, "stopped at iteration 5 of 10 after 3 restarts (MAX_RESTARTS=3): not requeueing"),
    (0, 4, False, "job 77 was restarted 4 times (MAX_RESTARTS=3): stopping"),
    (1, 0, False, "training failed (exit status 1): the job ends, not requeued"),
], ids=["early_stop_requeues", "last_restart_stops", "requeued_by_slurm_too_often", "failed_step_ends_the_job"])
def test_phase_job_requeues_a_bounded_number_of_times(tmp_path, status, restarts, requeued, message):
    """phase.sbatch's retry logic, with srun and scontrol stood in for (a real Slurm: the pre-emption test above):
    an early stop is requeued up to MAX_RESTARTS times, a failed step never, and the reason is in the job's log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    ckpt = tmp_path / "ckpt"
    env = {"DATA_PATH": "data", "TOKENIZER_MODEL": "tok.model", "CKPT_DIR": str(ckpt), "TRAIN_ITERS": "10",
           "PYTHON": PYTHON, "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_RESTART_COUNT": str(restarts), "MAX_RESTARTS": "3", "FAKE_STATUS": str(status)}
    result = subprocess.run(["bash", f"{SLURM_DIR}/phase.sbatch", "1"], capture_output=True, text=True, cwd=ROOT,
                            env={"PATH": f"{bin_dir}:{os.environ['PATH']}", **env})
    assert result.returncode == (0 if requeued else 1), result.stderr
    assert message in result.stdout + result.stderr
    log = ckpt / "scontrol.log"
    assert (log.read_text() if log.exists() else "") == ("requeue 77\n" if requeued else "")
