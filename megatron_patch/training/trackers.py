"""Experiment tracking and throughput: TensorBoard and Weights & Biases writers (Megatron-LM's flags), model TFLOP/s
per device, MFU and peak memory. Only global rank 0 writes; a backend is imported only when its flag asks for it.

Every point carries the compute axis (flops.py): `cumulative_tokens` and `cumulative_flops` count from the start of
the RUN, so phase 2 continues where phase 1 ended and a token-only baseline shares the axis. TensorBoard's step is
the cumulative token count.
"""

from __future__ import annotations

import importlib
import resource
import time
from typing import Optional

import torch

from megatron_patch.config.flags import flag_for
from megatron_patch.config.schema import ConfigError, TrackingConfig
from megatron_patch.distributed import parallel
from megatron_patch.method.flops import peak_tflops_of


def _backend(module: str, flag: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{flag} needs the {module.split('.')[0]} package ({e}); pip install it, or drop "
                          f"{flag}") from None


class Trackers:
    """The TensorBoard and W&B writers this run asked for (none on ranks other than 0)."""

    def __init__(self, tracking: TrackingConfig, config: dict, phase: str):
        self.tensorboard = self.wandb = None
        self.phase = phase
        if not parallel.is_rank_0():
            return
        if tracking.tensorboard_dir:
            writer = _backend("torch.utils.tensorboard", flag_for("tracking.tensorboard_dir"))
            self.tensorboard = writer.SummaryWriter(log_dir=tracking.tensorboard_dir)
        if tracking.wandb_project:
            wandb = _backend("wandb", flag_for("tracking.wandb_project"))
            self.wandb = wandb.init(project=tracking.wandb_project, name=tracking.wandb_exp_name,
                                    dir=tracking.wandb_save_dir, config=config, resume="allow")
            self.wandb.define_metric("*", step_metric="cumulative_tokens")

    def log(self, scalars: dict, cumulative_tokens: int) -> None:
        """Scalars under their names (prefixed by nothing: "train/loss", "valid/ppl", ...) at the run's token count."""
        if self.tensorboard is not None:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, global_step=cumulative_tokens)
        if self.wandb is not None:
            self.wandb.log(dict(scalars, cumulative_tokens=cumulative_tokens))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def peak_tflops(override: Optional[float]) -> tuple:
    """(peak TFLOP/s of one device, where the figure comes from): --peak-tflops, the device table, or on CPU (and
    devices the table does not know) the fp32 matmul throughput this process measures once."""
    if override:
        return override, "--peak-tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        table = peak_tflops_of(name)
        if table:
            return table, f"{name} (dense bf16 datasheet)"
    return measured_matmul_tflops(), "measured fp32 matmul"


def measured_matmul_tflops(size: int = 1024, seconds: float = 0.5) -> float:
    """Best fp32 matmul throughput of this process over `seconds` (the CPU's practical peak for MFU)."""
    device = parallel.device()
    # Constant operands: drawing random ones would move the RNG streams a resumed run must continue bit for bit.
    a = torch.full((size, size), 0.5, device=device)
    b = torch.full((size, size), 0.25, device=device)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 / (time.perf_counter() - started) / 1e12)
    return best


def peak_memory_bytes() -> int:
    """Peak memory of this process so far: allocated CUDA memory on a GPU, else the resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
