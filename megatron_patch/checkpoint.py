"""Checkpoints in Megatron-LM's layout, written atomically.

  {dir}/iter_0000100/mp_rank_00/model_optim_rng.pt     (mp_rank_TT_PPP with pipeline parallelism)
  {dir}/latest_checkpointed_iteration.txt              (the tracker: last COMPLETE iteration)

Every model-parallel rank of data-parallel rank 0 writes its shard into `iter_N.tmp/`; after a barrier rank 0
renames the directory and only then rewrites the tracker (temp file, fsync, rename). A crash at any point
leaves the previous checkpoint and the tracker pointing at it.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_patch.config import TRACKER



def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _shard_name() -> str:
    tp = parallel_state.get_tensor_model_parallel_rank()
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return f"mp_rank_{tp:02d}"
    return f"mp_rank_{tp:02d}_{parallel_state.get_pipeline_model_parallel_rank():03d}"


def _fsync_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_iteration(root: Optional[str]) -> Optional[int]:
    """The last complete iteration saved under root, or None."""
    if not root:
        return None
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        return None
    with open(tracker) as f:
        text = f.read().strip()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{tracker}: expected an iteration number, found {text!r}") from None


def save(root: str, iteration: int, state: dict) -> str:
    """Collective: every rank calls it; returns the checkpoint directory."""
    final = iteration_dir(root, iteration)
    staging = final + ".tmp"
    rank0 = dist.get_rank() == 0
    if rank0:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    dist.barrier()
    if parallel_state.get_data_parallel_rank() == 0:
        shard_dir = os.path.join(staging, _shard_name())
        os.makedirs(shard_dir, exist_ok=True)
        path = os.path.join(shard_dir, "model_optim_rng.pt")
        with open(path + ".tmp", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    dist.barrier()
    if rank0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        _fsync_write(os.path.join(root, TRACKER), f"{iteration}\n")
    dist.barrier()
    return final


def load(root: str, iteration: Optional[int] = None) -> dict:
    """This rank's shard of the checkpoint at `iteration` (default: the tracker's)."""
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise FileNotFoundError(f"{root}: no {TRACKER}; not a checkpoint directory")
    path = os.path.join(iteration_dir(root, iteration), _shard_name(), "model_optim_rng.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint shard missing: {path}")
    return torch.load(path, map_location="cpu", weights_only=False)
