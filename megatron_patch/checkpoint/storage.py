"""Checkpoints in Megatron-LM's layout, written atomically.

  {dir}/iter_0000100/mp_rank_00/model_optim_rng.pt     (mp_rank_TT_PPP with pipeline parallelism)
  {dir}/iter_0000100/run.json                          (config and what the run trained on, for guards)
  {dir}/latest_checkpointed_iteration.txt              (the tracker: last COMPLETE iteration)

Every model-parallel rank of data-parallel rank 0 writes its shard into `iter_N.tmp/`; after a barrier rank 0
renames the directory and only then rewrites the tracker (temp file, fsync, rename). A crash at any point
leaves the previous checkpoint and the tracker pointing at it.
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

from megatron_patch.checkpoint.layout import (
    RUN_FILE,
    TRACKER,
    fsync_write,
    iteration_dir,
    latest_iteration,
    write_tracker,
)
from megatron_patch.config.flags import flag_for
from megatron_patch.config.schema import ConfigError, TrainingConfig, from_dict, to_dict
from megatron_patch.config.tokenizer import SENTENCEPIECE_TYPES, TokenizerSpec

# What must not change under a resumed run (--load) / a phase hand-off (--pretrained-checkpoint).
MODEL_SHAPE = ["num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "normalization", "swiglu",
               "position_embedding_type", "rotary_base", "add_bias_linear", "untie_embeddings_and_output_weights",
               "group_query_attention", "num_query_groups",
               "transformer_impl"]  # Transformer Engine's layers name the (fused) norm weights differently
# A torch_dist checkpoint's RNG streams belong to this layout (one object per pipeline x tensor rank).
MODEL_PARALLEL_LAYOUT = ["tensor_model_parallel_size", "pipeline_model_parallel_size",
                         "virtual_pipeline_model_parallel_size"]
# The distributed optimizer's state in torch_dist: per parameter, so any TP/PP/DP layout can load it.
OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}
DISTRIB_OPTIM = "distrib_optim.pt"  # legacy format: the distributed optimizer's state, gathered (Megatron-LM's name)
SAMPLING = ["patch_size", "seq_length", "global_batch_size", "seed", "data.split", "data.train_data_range"]
# The only objects besides tensors, containers and scalars that our checkpoints hold: NumPy's RNG state (a uint32
# array) as NumPy 2 and NumPy 1 pickle it. Anything else in a pickle is refused by `read` (it could run code).
_NUMPY_CORE = np._core if hasattr(np, "_core") else np.core
SAFE_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                *((_NUMPY_CORE.multiarray._reconstruct, f"{module}.multiarray._reconstruct")
                  for module in ("numpy._core", "numpy.core"))]


class CheckpointError(ConfigError):
    """A checkpoint file we refuse to read (its pickle would run code or build objects no checkpoint of ours holds)."""


def model_key(index: int, num_chunks: int) -> str:
    """Megatron-LM's checkpoint keys: `model`, or `model0`, `model1`, ... with interleaved pipelining."""
    return "model" if num_chunks == 1 else f"model{index}"


def _shard_name() -> str:
    tp = parallel_state.get_tensor_model_parallel_rank()
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return f"mp_rank_{tp:02d}"
    return f"mp_rank_{tp:02d}_{parallel_state.get_pipeline_model_parallel_rank():03d}"


def describe_run(cfg: TrainingConfig, dataset_sizes: List[dict]) -> dict:
    """The config plus fingerprints of the tokenizer and datasets (not their paths: data may move)."""
    return {
        "config": to_dict(cfg),
        "tokenizer_sha256": TokenizerSpec.of(cfg.data).fingerprint(),
        "datasets": dataset_sizes,
    }


def _lookup(tree: dict, path: str):
    for part in path.split("."):
        tree = tree[part]
    return list(tree) if isinstance(tree, (list, tuple)) else tree


def check_compatible(saved: dict, current: dict, where: str, resume: bool) -> None:
    """ConfigError naming every difference that would make a resumed run (or a phase hand-off) silently wrong."""
    paths = [f"model.{name}" for name in MODEL_SHAPE] + (SAMPLING if resume else [])
    # Fields newer than the checkpoint take their defaults (what the run that wrote it had).
    saved = dict(saved, config=to_dict(from_dict(saved["config"])))
    diffs = [f"{p.split('.')[-1]}={_lookup(saved['config'], p)} (this run: {_lookup(current['config'], p)}, "
             f"{flag_for(p)})" for p in paths if _lookup(saved["config"], p) != _lookup(current["config"], p)]
    if saved["tokenizer_sha256"] != current["tokenizer_sha256"]:
        kinds = [TokenizerSpec.of(run["config"]["data"]).type for run in (saved, current)]
        diffs.append("a different --tokenizer-model file" if set(kinds) <= set(SENTENCEPIECE_TYPES) else
                     f"a different tokenizer ({kinds[0]}; this run: {kinds[1]} with other files or settings)")
    if resume and saved["datasets"] != current["datasets"]:
        diffs.append(f"different --data-path datasets ({saved['datasets']} vs this run's {current['datasets']})")
    if diffs:
        raise ConfigError(f"{where} was trained with " + "; ".join(diffs))


def save(root: str, iteration: int, state: dict, run: dict) -> str:
    """Collective: every rank calls it; returns the checkpoint directory."""
    return save_with(root, iteration, run, lambda staging: write_shard(staging, state))


def write_shard(staging: str, state: dict) -> None:
    """This model-parallel rank's `model_optim_rng.pt` (written by data-parallel rank 0 only)."""
    if parallel_state.get_data_parallel_rank() != 0:
        return
    shard_dir = os.path.join(staging, _shard_name())
    os.makedirs(shard_dir, exist_ok=True)
    path = os.path.join(shard_dir, "model_optim_rng.pt")
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


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (disk full, unwritable directory, ...): nothing of it is left where a
    resume would look, and the previous checkpoint stays the latest."""


def shard_file(iteration_dir: str, name: str) -> str:
    """A file of this rank's legacy shard directory."""
    return os.path.join(iteration_dir, _shard_name(), name)


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
    return dist_checkpointing.load(sharded_state, directory)


def save_with(root: str, iteration: int, run: dict, write: Callable[[str], None]) -> str:
    """Collective: every rank calls `write(staging_dir)`; the directory becomes `iter_N` and the tracker points at
    it only after every rank has returned. Returns the checkpoint directory. If any rank fails (an OSError: disk
    full, permissions), every rank raises the same CheckpointSaveError naming the file and the OS's reason, after
    rank 0 has removed the unfinished directory; the tracker still points at the previous checkpoint."""
    final = iteration_dir(root, iteration)
    staging = final + ".tmp"
    rank0 = dist.get_rank() == 0

    def stage():
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)

    def publish():
        # After the shards: dist_checkpointing expects an empty directory to write into.
        fsync_write(os.path.join(staging, RUN_FILE), json.dumps(run, indent=2, sort_keys=True))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        write_tracker(root, iteration)

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
        latest = latest_iteration(root)
        for directory in unfinished:
            if latest is None or directory != iteration_dir(root, latest):  # never the tracker's checkpoint
                shutil.rmtree(directory, ignore_errors=True)
    if error is not None and not isinstance(error, OSError):
        raise error
    raise CheckpointSaveError(f"checkpoint of iteration {iteration} not saved: {failures[0]}; the latest "
                              f"checkpoint in {root} is still {latest_iteration(root)}")


def load(root: str, iteration: Optional[int] = None) -> dict:
    """This rank's shard of the checkpoint at `iteration` (default: the tracker's)."""
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise FileNotFoundError(f"{root}: no {TRACKER}; not a checkpoint directory")
    path = os.path.join(iteration_dir(root, iteration), _shard_name(), "model_optim_rng.pt")
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
