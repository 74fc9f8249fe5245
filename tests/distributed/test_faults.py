"""A rank that fails mid-run: the others exit non-zero within a bounded time, nothing hangs, the latest complete
checkpoint stays the latest and the next run resumes from it. One run after another on the same checkpoint
directory, each ended by a fault: a Python exception on one rank (torchrun), kill -9 of one rank (torchrun), and
one rank stopped (SIGSTOP) with no launcher watching, where only --distributed-timeout-minutes ends the survivor."""

import os
import signal
import subprocess
import time

import psutil

from helpers import PYTHON, ROOT, TORCHRUN, free_port, phase_flags
from megatron_patch.checkpoint import layout, storage


def _start(cmd, out, env=None):
    with open(out, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env=dict(os.environ, **(env or {})))


def _wait_for(condition, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.02)


def _rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    """torchrun's worker of global rank `rank`."""
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "pretrain_patch_gpt.py" in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no worker of rank {rank}")


def _assert_complete(root, iteration):
    """The tracker points at `iteration`, whose checkpoint is whole and loads; nothing newer looks complete."""
    assert layout.latest_iteration(root) == iteration
    shard = os.path.join(layout.iteration_dir(root, iteration), "mp_rank_00", "model_optim_rng.pt")
    assert storage.read(shard)["iteration"] == iteration
    assert not os.path.exists(layout.iteration_dir(root, iteration) + ".tmp")


def test_a_failing_rank_ends_the_run_and_the_next_run_resumes(corpus, tmp_path):
    ckpt = tmp_path / "ckpt"
    flags = [*phase_flags(corpus, tmp_path, 4, steps=1000), "--save", str(ckpt), "--load", str(ckpt),
             "--save-interval", "3", "--exit-signal-handler", "--log-interval", "1",
             "--ckpt-format", "torch"]  # its saves fit in run 3's 6 s collective timeout on a busy machine
    torchrun = [*TORCHRUN, "--nproc-per-node", "2"]

    # 1. rank 1 raises at the start of step 5: rank 0, waiting in a collective, fails too; checkpoint 3 is kept.
    started = time.time()
    first = _start([*torchrun, "tests/distributed/raising_trainer.py", "1", "5", *flags], tmp_path / "1.out")
    assert first.wait(timeout=300) != 0
    output = (tmp_path / "1.out").read_text()
    assert "injected fault: rank 1 raises at iteration 5" in output
    assert "iteration      4/1000" in output and "iteration      5/1000" not in output
    _assert_complete(str(ckpt), 3)
    print(f"exception on rank 1: the run ended {time.time() - started:.1f} s after it started")

    # 2. resumed from 3; kill -9 of rank 1 once a checkpoint of this run is saved: torchrun ends the run.
    second = _start([*torchrun, "pretrain_patch_gpt.py", *flags], tmp_path / "2.out")
    _wait_for(lambda: (layout.latest_iteration(str(ckpt)) or 0) >= 6)
    _rank_process(second, 1).send_signal(signal.SIGKILL)
    killed = time.time()
    assert second.wait(timeout=120) != 0
    print(f"kill -9 of rank 1: torchrun exited {time.time() - killed:.1f} s later")
    assert time.time() - killed < 60
    assert f"resumed from {ckpt} at iteration 3" in (tmp_path / "2.out").read_text()
    saved = layout.latest_iteration(str(ckpt))
    _assert_complete(str(ckpt), saved)

    # 3. two processes started without a launcher (as srun or mpirun would); rank 1 stops (SIGSTOP) after this
    # run's first checkpoint: rank 0 waits in a collective until --distributed-timeout-minutes (6 s), then exits 1.
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    timeout = ["--distributed-timeout-minutes", "0.1"]
    ranks = [_start([PYTHON, "pretrain_patch_gpt.py", *flags, *timeout], tmp_path / f"3.rank{rank}.out",
                    dict(env, RANK=str(rank), LOCAL_RANK=str(rank))) for rank in (0, 1)]
    try:
        _wait_for(lambda: layout.latest_iteration(str(ckpt)) > saved)
        ranks[1].send_signal(signal.SIGSTOP)
        stopped = time.time()
        assert ranks[0].wait(timeout=120) == 1
        print(f"rank 1 stopped: rank 0 exited {time.time() - stopped:.1f} s later (timeout 6 s)")
        assert time.time() - stopped < 60
    finally:
        for process in ranks:
            process.kill()
            process.wait()
    output = (tmp_path / "3.rank0.out").read_text()
    assert f"resumed from {ckpt} at iteration {saved}" in output
    assert "Timed out" in output
    _assert_complete(str(ckpt), layout.latest_iteration(str(ckpt)))
