"""What a checkpoint is and whether this run may use it: `locate` finds a complete checkpoint iteration and the
config it was trained with (the one way every tool does it), `check_compatible` names every difference that would
make a resumed run or a phase hand-off silently wrong.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from typing import List, Optional

from megatron_patch.checkpoint import layout, reshard, storage
from megatron_patch.config.flags import flag_for
from megatron_patch.config.schema import ConfigError, ModelConfig, TrainingConfig, from_dict, to_dict
from megatron_patch.config.tokenizer import SENTENCEPIECE_TYPES, TokenizerSpec

# What must not change under a resumed run (--load) / a phase hand-off (--pretrained-checkpoint).
MODEL_SHAPE = ["num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "normalization", "swiglu",
               "position_embedding_type", "rotary_base", "add_bias_linear", "untie_embeddings_and_output_weights",
               "group_query_attention", "num_query_groups", "model_class", "hybrid_layer_pattern",
               "transformer_impl"]  # Transformer Engine's layers name the (fused) norm weights differently
SAMPLING = ["patch_size", "seq_length", "global_batch_size", "seed", "data.split", "data.train_data_range"]
# A torch_dist checkpoint's RNG streams belong to this layout (one object per pipeline x tensor rank).
MODEL_PARALLEL_LAYOUT = ["tensor_model_parallel_size", "pipeline_model_parallel_size",
                         "virtual_pipeline_model_parallel_size"]
READ_ERRORS = (OSError, EOFError, RuntimeError, KeyError, json.JSONDecodeError, pickle.UnpicklingError)


@dataclasses.dataclass
class SavedCheckpoint:
    """A complete checkpoint iteration of any layout and format (DeepSpeed's consolidated weights included)."""

    root: str
    iteration: int
    directory: str
    config: dict  # the TrainingConfig dict it was trained with
    run: Optional[dict]  # run.json (None for checkpoints written without one)

    @property
    def training_config(self) -> TrainingConfig:
        return from_dict(self.config)

    @property
    def model(self) -> ModelConfig:
        return self.training_config.model

    def full_weights(self) -> dict:
        """Every shard merged: full tensors under global names."""
        try:
            return reshard.full_state_dict(self.directory, reshard.sharding_for(self.model))
        except READ_ERRORS as e:
            raise storage.CheckpointError(f"{self.directory}: unreadable checkpoint ({type(e).__name__}: "
                                          f"{e})") from None


def locate(root: str, iteration: Optional[int] = None) -> SavedCheckpoint:
    """The tracker's (or `iteration`'s) checkpoint under `root` with its config, after checking that every file of
    its TP x PP layout is there; storage.CheckpointError naming what is not."""
    fail = storage.CheckpointError
    if not os.path.isdir(root):
        raise fail(f"{root}: not a checkpoint directory")
    explicit = iteration is not None
    if iteration is None:
        try:
            iteration = layout.latest_iteration(root)
        except ValueError as e:
            raise fail(f"{root}: incomplete checkpoint: {e}") from None
        if iteration is None:
            raise fail(f"{root}: not a checkpoint directory (no {layout.TRACKER})")
    directory = layout.iteration_dir(root, iteration)
    if not os.path.isdir(directory):
        raise fail(f"{root}: no checkpoint of iteration {iteration} ({os.path.basename(directory)})" if explicit else
                   f"{root}: incomplete checkpoint: no directory {os.path.basename(directory)} for iteration "
                   f"{iteration}")
    try:
        run = layout.read_run(root, iteration)
        if run is not None:
            config = run["config"]
        else:  # written without run.json: every shard carries the config
            shards = layout.legacy_shards(directory)
            if not shards:
                raise fail(f"{directory}: incomplete checkpoint: no {layout.RUN_FILE} and no "
                           f"mp_rank_*/{layout.SHARD_FILE} shards")
            config = storage.read(shards[0])["config"]
        tp = config["parallel"]["tensor_model_parallel_size"]
        pp = config["parallel"]["pipeline_model_parallel_size"]
    except READ_ERRORS as e:
        raise fail(f"{directory}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    missing = [name for name in layout.expected_files(directory, tp, pp)
               if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        raise fail(f"{directory}: incomplete checkpoint: missing {', '.join(missing)} (TP={tp} x PP={pp})")
    return SavedCheckpoint(root, iteration, directory, config, run)


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
