"""Megatron-LM's checkpoint directory layout, without torch (plans, Slurm checks and login nodes read it):

  {root}/iter_0000100/                          one checkpoint (model shards, run.json)
  {root}/latest_checkpointed_iteration.txt     the tracker: the last COMPLETE iteration
"""

from __future__ import annotations

import json
import os
from typing import Optional

TRACKER = "latest_checkpointed_iteration.txt"  # Megatron-LM's name for the last complete checkpoint
RUN_FILE = "run.json"  # next to the shards: the config and what the run trained on (for resume guards)


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


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
