"""Process groups and device, from whichever launcher started us.

torchrun and the deepspeed launcher set RANK / WORLD_SIZE / LOCAL_RANK; `srun` sets SLURM_PROCID / SLURM_NTASKS /
SLURM_LOCALID; mpirun (Open MPI) sets OMPI_COMM_WORLD_*. One process alone needs nothing. CUDA + NCCL when a GPU
is present, otherwise CPU + gloo with the megatron-core CPU shims.
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta

import numpy
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_patch.compat.cpu import apply_cpu_shims
from megatron_patch.compat.torch_adam import apply_torch_adam_fixes
from megatron_patch.config.schema import ConfigError, ParallelConfig

_LAUNCHER_ENV = [  # (rank, world size, local rank)
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
]


@dataclass
class Launch:
    rank: int
    world_size: int
    local_rank: int


def launch_from_env() -> Launch:
    for rank, world, local in _LAUNCHER_ENV:
        if rank in os.environ and world in os.environ:
            return Launch(int(os.environ[rank]), int(os.environ[world]), int(os.environ.get(local, 0)))
    return Launch(0, 1, 0)


def free_port() -> int:
    """A TCP port free on this host now (for a lone process's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def initialize(parallel: ParallelConfig, seed: int, launch: Launch | None = None) -> Launch:
    """Start torch.distributed and megatron-core's model-parallel groups; seed every RNG."""
    launch = launch or launch_from_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        apply_cpu_shims()
        backend = "gloo"
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if launch.world_size > 1:
                raise ConfigError(
                    f"MASTER_PORT is not set for a {launch.world_size}-process run (torchrun and the deepspeed "
                    "launcher set it; with srun or mpirun export MASTER_ADDR and MASTER_PORT)"
                )
            os.environ["MASTER_PORT"] = str(free_port())  # a lone process: never collide with another job
        # Every collective (and the start-up rendezvous) on a dead or stopped peer fails after this timeout rather
        # than hanging: gloo honours it per operation, NCCL through its watchdog.
        dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size,
                                timeout=timedelta(minutes=parallel.distributed_timeout_minutes))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        distributed_timeout_minutes=parallel.distributed_timeout_minutes,  # its groups: the same timeout
    )
    apply_torch_adam_fixes()
    seed_everything(seed)
    return launch


def seed_everything(seed: int) -> None:
    """Seed the default generators and megatron-core's model-parallel RNG tracker (each TP rank its own
    stream for dropout inside tensor-parallel regions)."""
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def rng_states() -> dict:
    """Every RNG a training step draws from, for checkpoints (resume must continue the same streams)."""
    return {
        "random": random.getstate(),
        "numpy": numpy.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_states(states: dict) -> None:
    random.setstate(states["random"])
    numpy.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(states["tracker"])


def is_rank_0() -> bool:
    """Global rank 0 (or no process group at all): the one process that prints and writes shared files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def print_rank_0(message: str) -> None:
    """Megatron-LM's name: a line from global rank 0 only."""
    if is_rank_0():
        print(message, flush=True)


def destroy() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
