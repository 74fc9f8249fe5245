"""Checkpoint files written atomically and read safely, in Megatron-LM's layout (layout.py names every file).

Writing (`save_with`): every rank writes its part into `iter_N.tmp/` (a legacy shard: data-parallel rank 0 of
each model-parallel rank; torch_dist: megatron-core's dist_checkpointing); when all have returned, rank 0 adds
run.json, renames the directory and only then rewrites the tracker (temp file, fsync, rename). A crash or a full
disk at any point leaves the previous checkpoint and the tracker pointing at it.
Reading (`read`): torch.load with weights_only and an allow-list, so a file from elsewhere cannot run code.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_patch.checkpoint import layout
from megatron_patch.config.schema import ConfigError
from megatron_patch.errors import MegatronPatchError

# The only objects besides tensors, containers and scalars that our checkpoints hold: NumPy's RNG state (a uint32
# array) as NumPy 2 and NumPy 1 pickle it. Anything else in a pickle is refused by `read` (it could run code).
_NUMPY_CORE = np._core if hasattr(np, "_core") else np.core
SAFE_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                *((_NUMPY_CORE.multiarray._reconstruct, f"{module}.multiarray._reconstruct")
                  for module in ("numpy._core", "numpy.core"))]


class CheckpointError(ConfigError):
    """A checkpoint file we refuse to read (its pickle would run code or build objects no checkpoint of ours holds)."""


def shard_file(directory: str, name: str = layout.SHARD_FILE) -> str:
    """A file of this rank's legacy shard directory."""
    return layout.shard_path(directory, parallel_state.get_tensor_model_parallel_rank(),
                             parallel_state.get_pipeline_model_parallel_rank(),
                             parallel_state.get_pipeline_model_parallel_world_size(), name)


def save(root: str, iteration: int, state: dict, run: dict) -> str:
    """Collective: every rank calls it; returns the checkpoint directory."""
    return save_with(root, iteration, run, lambda staging: write_shard(staging, state))


def write_shard(staging: str, state: dict) -> None:
    """This model-parallel rank's `model_optim_rng.pt` (written by data-parallel rank 0 only)."""
    if parallel_state.get_data_parallel_rank() != 0:
        return
    path = shard_file(staging)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            recorder = _WriteErrors(f)
            try:
                torch.save(state, recorder)
            except RuntimeError as e:  # torch reports a failed write as "unexpected pos ...": give the OS's reason
                if recorder.error is None:
                    raise
                raise recorder.error from e
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # buffered writes name no file
        raise OSError(e.errno, e.strerror, e.filename or tmp) from None
    os.replace(tmp, path)


class _WriteErrors:
    """A file for torch.save that keeps the OSError of a failed write (disk full, quota, I/O error)."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.file.flush()


class CheckpointSaveError(MegatronPatchError, RuntimeError):
    """A checkpoint could not be written (disk full, unwritable directory, ...): nothing of it is left where a
    resume would look, and the previous checkpoint stays the latest."""

    exit_code = 1
    collective = True  # every rank has the message; rank 0 says it


def rng_object(states: dict) -> ShardedObject:
    """This rank's RNG streams in a torch_dist checkpoint: one object per (pipeline, tensor) rank, data-parallel
    ranks holding replicas (they draw the same dropout masks)."""
    return ShardedObject("rng_state", states,
                         (parallel_state.get_pipeline_model_parallel_world_size(),
                          parallel_state.get_tensor_model_parallel_world_size()),
                         (parallel_state.get_pipeline_model_parallel_rank(),
                          parallel_state.get_tensor_model_parallel_rank()),
                         replica_id=parallel_state.get_data_parallel_rank())


def save_torch_dist(root: str, iteration: int, sharded_state: dict, run: dict) -> str:
    """Collective: megatron-core dist_checkpointing writes every rank's shards into the staging directory, which
    becomes `iter_N` (and the tracker moves) only when all have returned."""
    return save_with(root, iteration, run, lambda staging: dist_checkpointing.save(sharded_state, staging))


def load_torch_dist(directory: str, sharded_state: dict) -> dict:
    """Collective: the tensors `sharded_state` asks for, cut for this rank's layout from a torch_dist checkpoint."""
    check_torch_dist(directory)
    return dist_checkpointing.load(sharded_state, directory)


# What torch.distributed.checkpoint's `.metadata` pickle may build: DCP's own metadata and planner classes, the
# file system writer's storage record, torch.Size, dtypes and layouts. Its reader uses plain pickle.load.
_DCP_CLASS_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")
_DCP_GLOBALS = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                ("torch.serialization", "_get_layout")}


class _Refused(pickle.UnpicklingError):
    """A global outside the allow-list (the pickle could run code), not a damaged file."""


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        found = super().find_class(module, name) if (
            module in _DCP_CLASS_MODULES or (module, name) in _DCP_GLOBALS or module == "torch") else None
        allowed = (module, name) in _DCP_GLOBALS or (module in _DCP_CLASS_MODULES and isinstance(found, type)) or (
            module == "torch" and isinstance(found, torch.dtype))
        if not allowed:
            raise _Refused(f"GLOBAL {module}.{name}")
        return found


def check_torch_dist(directory: str) -> None:
    """Before torch or megatron-core read anything of a torch_dist checkpoint: refuse it (CheckpointError naming
    the file) if its pickles would build more than a checkpoint holds (DCP's `.metadata` through the allow-list
    above, megatron-core's `common.pt`, before 0.19, through `read`'s), or if it is damaged: `.metadata` or
    `metadata.json` unreadable, a `.distcp` shard missing or shorter than the data `.metadata` places in it."""
    metadata = os.path.join(directory, layout.DCP_METADATA)
    try:
        with open(metadata, "rb") as f:
            storage = _DCPMetadataUnpickler(f).load().storage_data
    except _Refused as e:
        raise CheckpointError(f"refusing to load {metadata}: it holds objects that would run code on loading "
                              f"({e}): not a checkpoint this trainer wrote") from None
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{metadata}: unreadable torch_dist metadata ({type(e).__name__}: {e}); the "
                              f"checkpoint is damaged: use an earlier iteration") from None
    common = os.path.join(directory, "common.pt")
    if os.path.exists(common):
        read(common)
    megatron_metadata = os.path.join(directory, layout.TORCH_DIST_METADATA)
    try:
        with open(megatron_metadata) as f:
            json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{megatron_metadata}: unreadable ({type(e).__name__}: {e}); the checkpoint is "
                              f"damaged: use an earlier iteration") from None
    needed = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = os.path.join(directory, name)
        have = os.path.getsize(path) if os.path.isfile(path) else None
        if have is None or have < size:
            raise CheckpointError(f"{path}: {'missing' if have is None else f'cut short ({have} of {size} bytes)'}; "
                                  f"the checkpoint is damaged: use an earlier iteration")


def save_with(root: str, iteration: int, run: dict, write: Callable[[str], None]) -> str:
    """Collective: every rank calls `write(staging_dir)`; the directory becomes `iter_N` and the tracker points at
    it only after every rank has returned. Returns the checkpoint directory. If any rank fails (an OSError: disk
    full, permissions), every rank raises the same CheckpointSaveError naming the file and the OS's reason, after
    rank 0 has removed the unfinished directory; the tracker still points at the previous checkpoint."""
    final, staging = layout.iteration_dir(root, iteration), layout.staging_dir(root, iteration)
    rank0 = dist.get_rank() == 0

    def stage():
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)

    def publish():
        # After the shards: dist_checkpointing expects an empty directory to write into.
        layout.write_run(staging, run)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        layout.write_tracker(root, iteration)

    # Each step ends with an exchange of errors, which is also the barrier between the steps.
    _on_every_rank(stage if rank0 else None, root, iteration, [staging])
    _on_every_rank(lambda: write(staging), root, iteration, [staging])
    _on_every_rank(publish if rank0 else None, root, iteration, [staging, final])
    return final


def _on_every_rank(step: Optional[Callable[[], None]], root: str, iteration: int, unfinished: List[str]) -> None:
    """Run `step` here (None: nothing to do on this rank), then agree with every rank on whether all succeeded;
    if not, rank 0 removes `unfinished` directories and every rank raises (the failing rank its own exception
    unless it is an OSError, which becomes a CheckpointSaveError everywhere)."""
    error = None
    try:
        if step is not None:
            step()
    except Exception as e:  # every rank must reach the exchange below, whatever happened here
        error = e
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else f"{error} (rank {dist.get_rank()})")
    failures = [e for e in errors if e is not None]
    if not failures:
        return
    if dist.get_rank() == 0:
        latest = layout.latest_iteration(root)
        for directory in unfinished:
            if latest is None or directory != layout.iteration_dir(root, latest):  # never the tracker's checkpoint
                shutil.rmtree(directory, ignore_errors=True)
    if error is not None and not isinstance(error, OSError):
        raise error
    raise CheckpointSaveError(f"checkpoint of iteration {iteration} not saved: {failures[0]}; the latest "
                              f"checkpoint in {root} is still {layout.latest_iteration(root)}")


def load(root: str, iteration: Optional[int] = None) -> dict:
    """This rank's shard of the checkpoint at `iteration` (default: the tracker's)."""
    if iteration is None:
        iteration = layout.latest_iteration(root)
        if iteration is None:
            raise FileNotFoundError(f"{root}: no {layout.TRACKER}; not a checkpoint directory")
    path = shard_file(layout.iteration_dir(root, iteration))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint shard missing: {path}")
    return read(path)


def read(path: str, extra_globals: Sequence = (), map_location="cpu") -> dict:
    """A checkpoint file loaded with `torch.load(weights_only=True)`: tensors, containers, scalars and the
    SAFE_GLOBALS (plus `extra_globals`) only, so a file from elsewhere cannot run code; CheckpointError if it tries."""
    try:
        with torch.serialization.safe_globals([*SAFE_GLOBALS, *extra_globals]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e)) or re.search(r"got <class '([\w.]+)'>", str(e))
        what = f"GLOBAL {found.group(1)}" if found else "objects outside the allow-list"
        raise CheckpointError(f"refusing to load {path}: it holds objects that would run code on loading ({what}): "
                              f"not a checkpoint this trainer wrote") from None
