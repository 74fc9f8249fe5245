#!/usr/bin/env python3
"""torchrun's job for the tests, without torchrun: `python tests/ranks.py N SCRIPT [ARGS...]` starts N
processes running `python SCRIPT ARGS` with the environment torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR, a free MASTER_PORT as with --standalone, OMP_NUM_THREADS=1 unless set),
passes their output through, and when one exits non-zero stops the others (SIGTERM, then SIGKILL after 30 s) and
exits with its code, as torchrun does.

Why: torchrun imports torch before it starts anyone: ~3 s of CPU per launch on these machines, for each of the
suite's ~100 multi-process runs. The tests of launching itself (torchrun's failure handling, the deepspeed
launcher, srun) use the real launchers.
"""

import os
import socket
import subprocess
import sys
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    nproc, command = int(sys.argv[1]), sys.argv[2:]
    common = {"WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
              # Always a fresh port, as torchrun --standalone: an inherited MASTER_PORT may be the caller's own
              # process group's (the test process holds one).
              "MASTER_PORT": str(free_port()),
              "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    workers = [subprocess.Popen([sys.executable, *command],
                                env=dict(os.environ, **common, RANK=str(rank), LOCAL_RANK=str(rank)))
               for rank in range(nproc)]
    while True:
        codes = [worker.poll() for worker in workers]
        failed = [code for code in codes if code not in (None, 0)]
        if failed or all(code == 0 for code in codes):
            break
        time.sleep(0.05)
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
    for worker in workers:
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    sys.exit(failed[0] if failed else 0)


if __name__ == "__main__":
    main()
