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
import shutil
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_patch.config import ConfigError, TrainingConfig, from_dict, to_dict
from megatron_patch.data.tokenizer import model_sha256
from megatron_patch.flags import flag_for
from megatron_patch.tracker import RUN_FILE, TRACKER, fsync_write, iteration_dir, latest_iteration, write_tracker

# What must not change under a resumed run (--load) / a phase hand-off (--pretrained-checkpoint).
MODEL_SHAPE = ["num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "normalization", "swiglu",
               "position_embedding_type", "rotary_base", "add_bias_linear", "untie_embeddings_and_output_weights",
               "group_query_attention", "num_query_groups",
               "transformer_impl"]  # Transformer Engine's layers name the (fused) norm weights differently
SAMPLING = ["patch_size", "seq_length", "global_batch_size", "seed", "data.split", "data.train_data_range"]


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
        "tokenizer_sha256": model_sha256(cfg.data.tokenizer_model),
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
        diffs.append("a different --tokenizer-model file")
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
    with open(path + ".tmp", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def save_with(root: str, iteration: int, run: dict, write: Callable[[str], None]) -> str:
    """Collective: every rank calls `write(staging_dir)`; the directory becomes `iter_N` and the tracker points at
    it only after every rank has returned. Returns the checkpoint directory."""
    final = iteration_dir(root, iteration)
    staging = final + ".tmp"
    rank0 = dist.get_rank() == 0
    if rank0:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        fsync_write(os.path.join(staging, RUN_FILE), json.dumps(run, indent=2, sort_keys=True))
    dist.barrier()
    write(staging)
    dist.barrier()
    if rank0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        write_tracker(root, iteration)
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
