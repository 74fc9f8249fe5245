"""A real Slurm on this machine for the tests of slurm/: a controller and two emulated compute nodes n1 and n2 on
localhost, each with its own slurmd. Installed with apt-get when missing (as root). Every process a session starts
(daemons, job steps, jobs) carries its mark in the environment: all of them are stopped at the end, also when a
test fails, and what a killed earlier session left behind is cleaned up first.

Authentication is `auth/none` (one machine, no munge daemon to run). n1/n2 must resolve to 127.0.0.1 for the
scripts' rendezvous on the first node: the harness adds an /etc/hosts line, tagged with its pid, and removes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from helpers import ensure_programs
from megatron_patch.distributed.parallel import free_port

NODES = ("n1", "n2")
RUNTIME_ROOT = Path(tempfile.gettempdir()) / "megatron-patch-slurm"
HOSTS_FILE = Path("/etc/hosts")
HOSTS_TAG = "# megatron-patch tests/slurm pid="
SESSION_VARIABLE = "MEGATRON_PATCH_SLURM_SESSION"  # = the pytest pid, in every process a session starts
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"}


def _alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def _stale(session: int) -> bool:
    """A session that cannot clean up any more: its pytest is gone (or was an earlier holder of our pid)."""
    return session == os.getpid() or not _alive(session)


def _session_processes() -> dict:
    """{session: [pids]}: the processes carrying SESSION_VARIABLE, i.e. each session's daemons, job steps and
    job processes (the jobs inherit the environment of the sbatch that submitted them)."""
    found, prefix = {}, SESSION_VARIABLE.encode() + b"="
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                variables = f.read().split(b"\0")
        except (OSError, ValueError):  # not a process, or gone
            continue
        for variable in variables:
            if variable.startswith(prefix) and variable[len(prefix):].isdigit():
                found.setdefault(int(variable[len(prefix):]), []).append(int(entry))
    return found


def _stop_processes(pids, grace=10.0):
    """SIGTERM, then SIGKILL whatever is left after `grace` seconds."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _edit_hosts(keep, add=None):
    """Rewrite /etc/hosts in place (it may be a bind mount, which a rename would not replace), under a lock so that
    concurrent sessions do not drop each other's lines."""
    with open(HOSTS_FILE, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        lines = [line for line in f.read().splitlines(keepends=True) if keep(line)]
        if add:
            if lines and not lines[-1].endswith("\n"):
                lines[-1] += "\n"
            lines.append(add + "\n")
        f.seek(0)
        f.writelines(lines)
        f.truncate()


def _hosts_line_owner(line: str):
    match = re.search(re.escape(HOSTS_TAG) + r"(\d+)", line)
    return int(match.group(1)) if match else None


def _stale_hosts_line(line: str) -> bool:
    owner = _hosts_line_owner(line)
    return owner is not None and _stale(owner)


def clean_previous_sessions():
    """Stop the processes, drop the files and the hosts lines of sessions that did not get to clean up (a killed
    pytest)."""
    for session, pids in _session_processes().items():
        if _stale(session):
            _stop_processes(pids)
    for directory in RUNTIME_ROOT.glob("*"):
        if directory.name.isdigit() and _stale(int(directory.name)):
            shutil.rmtree(directory, ignore_errors=True)
    if HOSTS_FILE.exists() and HOSTS_TAG in HOSTS_FILE.read_text():
        _edit_hosts(lambda line: not _stale_hosts_line(line))


def _resolves_to_loopback(name: str) -> bool:
    try:
        return socket.gethostbyname(name).startswith("127.")
    except OSError:
        return False


class SlurmCluster:
    def __init__(self, directory: Path):
        self.dir = directory
        self.conf = directory / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf), **{SESSION_VARIABLE: str(os.getpid())})

    def command(self, *cmd, check=True, env=None, cwd=None, timeout=60) -> subprocess.CompletedProcess:
        result = subprocess.run(cmd, capture_output=True, text=True, env={**self.env, **(env or {})}, cwd=cwd,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))} exited {result.returncode}\n{result.stdout}\n"
                                 f"{result.stderr}")
        return result

    def write_config(self):
        ports = set()
        while len(ports) < 1 + len(NODES):
            ports.add(free_port())
        ctld_port, *node_ports = sorted(ports)
        d = self.dir
        nodes = "\n".join(f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs=2"
                          for name, port in zip(NODES, node_ports))
        self.conf.write_text(f"""\
ClusterName=mptest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/none
CredType=cred/none
# A requeued job waits for its credential to expire before it starts again (default 120 s).
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
# Finished jobs leave the controller soon, the scheduler looks at pending jobs every second, and a failed
# dependency cancels the jobs waiting on it instead of leaving them pending forever.
MinJobAge=5
KillWait=5
SchedulerParameters=bf_interval=1,sched_interval=1
DependencyParameters=kill_invalid_depend
{nodes}
PartitionName=test Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")
        (d / "state").mkdir()
        for name in NODES:
            (d / "spool" / name).mkdir(parents=True)

    def start(self):
        self.command("slurmctld", "-f", self.conf, "-i")
        for name in NODES:
            self.command("slurmd", "-f", self.conf, "-N", name)
        deadline = time.time() + 30
        while time.time() < deadline:
            states = self.command("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
            if states == [word for name in NODES for word in (name, "idle")]:
                return
            time.sleep(0.3)
        raise AssertionError(f"the nodes did not come up: {states}\n{(self.dir / 'slurmctld.log').read_text()}")

    def stop(self):
        """Cancel every job, shut the daemons down and make sure each one is gone."""
        jobs = self.command("squeue", "-h", "-o", "%A", check=False).stdout.split()
        if jobs:
            self.command("scancel", *jobs, check=False)
            deadline = time.time() + 30
            while time.time() < deadline and self.command("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        self.command("scontrol", "shutdown", check=False)
        deadline = time.time() + 10
        while time.time() < deadline and _session_processes().get(os.getpid()):
            time.sleep(0.2)
        _stop_processes(_session_processes().get(os.getpid(), []))

    def sbatch(self, *args, env=None, cwd=None) -> str:
        return self.command("sbatch", "--parsable", *args, env=env, cwd=cwd).stdout.strip().split(";")[0]

    def job_state(self, job_id: str):
        """(JobState, ExitCode, Restarts) of a job the controller still knows, else None."""
        result = self.command("scontrol", "-o", "show", "job", job_id, check=False)
        fields = dict(re.findall(r"(\w+)=(\S*)", result.stdout))
        return (fields["JobState"], fields["ExitCode"], int(fields["Restarts"])) if "JobState" in fields else None

    def wait_job(self, job_id: str, timeout: float = 180):
        """Wait until the job ends; its final (JobState, ExitCode, Restarts). A requeued job goes on."""
        deadline, last = time.time() + timeout, None
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state is None:
                raise AssertionError(f"job {job_id} vanished; last seen {last}")
            if state[0] in TERMINAL_STATES:
                return state
            last = state
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} still {last} after {timeout} s")


@contextlib.contextmanager
def running_cluster():
    """A running two-node Slurm (see the module docstring); SLURM_CONF for clients is in `cluster.env`."""
    ensure_programs(["slurmctld", "slurmd", "sbatch"], ["slurmctld", "slurmd", "slurm-client"])
    clean_previous_sessions()
    directory = RUNTIME_ROOT / str(os.getpid())
    cluster = SlurmCluster(directory)
    # Our own line even when another session's already maps the names: that one may go away while we run.
    added_hosts = os.access(HOSTS_FILE, os.W_OK)
    try:
        if added_hosts:
            _edit_hosts(lambda line: True, f"127.0.0.1 {' '.join(NODES)}  {HOSTS_TAG}{os.getpid()}")
        if not all(_resolves_to_loopback(name) for name in NODES):
            pytest.skip(f"{' and '.join(NODES)} do not resolve to 127.0.0.1 and {HOSTS_FILE} cannot map them")
        directory.mkdir(parents=True)
        cluster.write_config()
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if added_hosts:
            _edit_hosts(lambda line: _hosts_line_owner(line) != os.getpid())
        shutil.rmtree(directory, ignore_errors=True)
