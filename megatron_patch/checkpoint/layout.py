"""Every file and directory name of a checkpoint, without torch (plans, Slurm checks and login nodes read it).
Megatron-LM's layout:

  {root}/latest_checkpointed_iteration.txt         the tracker: the last COMPLETE iteration
  {root}/iter_0000100/run.json                     the config and what the run trained on (resume guards)
  {root}/iter_0000100/metadata.json, *.distcp, common.pt     torch_dist (megatron-core dist_checkpointing;
                                                              0.19 keeps common.pt's state in the .distcp)
  {root}/iter_0000100/mp_rank_00/model_optim_rng.pt          legacy torch format, one file per model-parallel
  {root}/iter_0000100/mp_rank_00_000/distrib_optim.pt        rank (mp_rank_TT_PPP with pipeline parallelism)
  {root}/iter_0000100.tmp/                         a checkpoint being written (renamed when every rank is done)
"""

from __future__ import annotations

import glob
import json
import os
from typing import List, Optional

TRACKER = "latest_checkpointed_iteration.txt"  # Megatron-LM's name for the last complete checkpoint
RUN_FILE = "run.json"  # next to the shards: the config and what the run trained on (for resume guards)
SHARD_FILE = "model_optim_rng.pt"  # legacy format: a model-parallel rank's model, optimizer and RNG state
DISTRIB_OPTIM = "distrib_optim.pt"  # legacy format: the distributed optimizer's state, gathered (Megatron-LM's name)
TORCH_DIST_METADATA = "metadata.json"  # megatron-core writes it last, after every rank's torch_dist shards
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the .distcp shards (a pickle)


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def staging_dir(root: str, iteration: int) -> str:
    return iteration_dir(root, iteration) + ".tmp"


def shard_dir_name(tp_rank: int, pp_rank: int, pp: int) -> str:
    """Megatron-LM's directory of one model-parallel rank's legacy shard: `mp_rank_TT`, or `mp_rank_TT_PPP` with
    pipeline parallelism."""
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def shard_path(directory: str, tp_rank: int, pp_rank: int, pp: int, name: str = SHARD_FILE) -> str:
    return os.path.join(directory, shard_dir_name(tp_rank, pp_rank, pp), name)


def legacy_shards(directory: str) -> List[str]:
    """Every `mp_rank_*/model_optim_rng.pt` of a legacy checkpoint directory, sorted."""
    return sorted(glob.glob(os.path.join(directory, "mp_rank_*", SHARD_FILE)))


def is_torch_dist(directory: str) -> bool:
    """Whether an iteration directory holds a torch_dist checkpoint rather than per-rank legacy files."""
    return os.path.isfile(os.path.join(directory, TORCH_DIST_METADATA))


def expected_files(directory: str, tp: int, pp: int) -> List[str]:
    """The files (relative to the iteration directory) that must exist for its checkpoint to be complete."""
    if is_torch_dist(directory):
        return [TORCH_DIST_METADATA]
    return [os.path.join(shard_dir_name(t, p, pp), SHARD_FILE) for t in range(tp) for p in range(pp)]


def model_key(index: int, num_chunks: int) -> str:
    """Megatron-LM's checkpoint keys: `model`, or `model0`, `model1`, ... with interleaved pipelining."""
    return "model" if num_chunks == 1 else f"model{index}"


def has_tracker(root: str) -> bool:
    return os.path.isfile(os.path.join(root, TRACKER))


def latest_iteration(root: Optional[str]) -> Optional[int]:
    """The last complete iteration saved under root, or None."""
    if not root or not has_tracker(root):
        return None
    tracker = os.path.join(root, TRACKER)
    with open(tracker) as f:
        text = f.read().strip()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{tracker}: expected an iteration number, found {text!r}") from None


def write_tracker(root: str, iteration: int) -> None:
    """Point the tracker at `iteration`, atomically (temp file, fsync, rename)."""
    fsync_write(os.path.join(root, TRACKER), f"{iteration}\n")


def fsync_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # disk full, permissions: no temp file left behind, and the error names the file
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(e.errno, e.strerror, e.filename or tmp) from None


def read_run(root: str, iteration: int) -> Optional[dict]:
    """The run description saved with a checkpoint (None for checkpoints written without one)."""
    path = os.path.join(iteration_dir(root, iteration), RUN_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_run(directory: str, run: dict) -> None:
    fsync_write(os.path.join(directory, RUN_FILE), json.dumps(run, indent=2, sort_keys=True))
