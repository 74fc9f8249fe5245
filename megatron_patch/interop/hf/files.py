"""The files of both directions: HF model directories read and written, the staged (atomic) output directory,
and `write_checkpoint`, which writes full tensors as a checkpoint of any TP x PP layout, sharded exactly as
megatron-core shards them (reshard.py's split), which --pretrained-checkpoint loads."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, PretrainedConfig

from megatron_patch.checkpoint import layout, reshard
from megatron_patch.checkpoint.guards import READ_ERRORS
from megatron_patch.config.schema import (
    DataConfig,
    ModelConfig,
    ParallelConfig,
    TrainingConfig,
    from_dict,
    padded_vocab_size,
    to_dict,
)
from megatron_patch.config.tokenizer import TokenizerError, TokenizerSpec
from megatron_patch.interop.hf.errors import ExportError
from megatron_patch.interop.hf.families import EMBEDDING, OUTPUT, as_hf_config, local_names, num_query_groups

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_LINEAR_MODULES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output_layer")


def save_hf(out_dir: str, state: dict, config: PretrainedConfig, dtype: torch.dtype) -> None:
    """config.json, model.safetensors and generation_config.json of an HF model directory."""
    os.makedirs(out_dir, exist_ok=True)
    config.dtype = str(dtype).removeprefix("torch.")
    save_file({name: t.to(dtype).contiguous() for name, t in state.items()}, os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)


def read_hf_config(hf_dir: str) -> PretrainedConfig:
    """config.json of an HF model directory as a LlamaConfig / GPT2Config; ExportError for anything else."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ExportError(f"{hf_dir}: no config.json (not a HuggingFace model directory)")
    try:
        with open(path) as f:
            return as_hf_config(json.load(f))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise ExportError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def read_hf_weights(hf_dir: str) -> dict:
    """The state dict of an HF model directory: model.safetensors or pytorch_model.bin, sharded (*.index.json) or
    not (pickles are read with weights_only=True)."""
    found = next((name for name in WEIGHT_FILES if os.path.isfile(os.path.join(hf_dir, name))), None)
    if found is None:
        raise ExportError(f"{hf_dir}: no weights ({', '.join(WEIGHT_FILES)})")
    try:
        files = [found]
        if found.endswith(".index.json"):
            with open(os.path.join(hf_dir, found)) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for name in files:
            path = os.path.join(hf_dir, name)
            state.update(load_file(path) if name.endswith(".safetensors")
                         else torch.load(path, map_location="cpu", weights_only=True))
    except (*READ_ERRORS, ValueError) as e:
        raise ExportError(f"{hf_dir}: unreadable weights ({type(e).__name__}: {e})") from None
    return state


def check_output(out: str, overwrite: bool) -> None:
    if os.path.lexists(out) and not overwrite:
        raise ExportError(f"{out} exists (--overwrite replaces it)")


@contextlib.contextmanager
def staged_directory(out: str, overwrite: bool):
    """Yields `OUT.tmp-<pid>` to write into; on success it becomes `out` (an existing `out` is refused unless
    `overwrite`: then it is renamed away, the new one renamed in, the old one deleted). On any failure or interrupt
    the temporary directory is removed and `out` is untouched."""
    check_output(out, overwrite)
    out = os.path.normpath(out)
    staging, old = f"{out}.tmp-{os.getpid()}", f"{out}.old-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
        check_output(out, overwrite)
        if os.path.lexists(out):
            os.replace(out, old)
            try:
                os.replace(staging, out)
            except BaseException:
                os.replace(old, out)
                raise
            if os.path.isdir(old):
                shutil.rmtree(old)
            else:
                os.remove(old)
        else:
            os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def import_config(model: ModelConfig, tp: int, pp: int, tokenizer: TokenizerSpec) -> dict:
    """The run config (TrainingConfig dict) a checkpoint imported from HF records: the model, the layout, the
    tokenizer; the rest defaults (only the model shape and the tokenizer are checked by a hand-off)."""
    return to_dict(TrainingConfig(
        model=model, parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
        data=DataConfig(**dataclasses.asdict(tokenizer)),
        seq_length=model.max_position_embeddings or TrainingConfig.seq_length))


def check_layout(model: ModelConfig, tp: int, pp: int) -> None:
    if tp < 1 or pp < 1 or model.num_attention_heads % tp or model.num_layers % pp:
        raise ExportError(f"--tensor-model-parallel-size {tp} must divide the {model.num_attention_heads} attention "
                          f"heads and --pipeline-model-parallel-size {pp} the {model.num_layers} layers")
    if num_query_groups(model) % tp:
        raise ExportError(f"--tensor-model-parallel-size {tp} must divide the {num_query_groups(model)} key/value "
                          f"groups (num_key_value_heads)")


def write_checkpoint(full: dict, cfg_dict: dict, out_root: str, tp: int, pp: int, iteration: int = 0) -> str:
    """Write full weights (global names) as a complete checkpoint of layout TP x PP in our layout: every
    `mp_rank_*/model_optim_rng.pt` holds what that rank's model chunk holds, sharded as megatron-core shards it
    (vocabulary rows zero-padded to a multiple of 128 x TP), then run.json, and the tracker last. The config
    records the layout; the tokenizer fingerprint is that of the config's data.tokenizer_model (when it exists).
    Returns the iteration directory."""
    cfg = copy.deepcopy(cfg_dict)
    cfg["parallel"].update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=False,
                           num_layers_per_virtual_pipeline_stage=None, virtual_pipeline_model_parallel_size=None)
    model = from_dict(cfg["model"], ModelConfig)
    check_layout(model, tp, pp)
    full = local_names(full)
    tied = not model.untie_embeddings_and_output_weights
    if tied:
        full.pop(OUTPUT, None)
    rows = padded_vocab_size(full[EMBEDDING].size(0), tp)
    sharding = reshard.sharding_for(model)
    per_stage = model.num_layers // pp
    directory = layout.iteration_dir(out_root, iteration)
    for pp_rank in range(pp):
        stage = _stage_weights(full, pp_rank, pp, per_stage, tied)
        for tp_rank in range(tp):
            shard = {}
            for name, tensor in stage.items():
                if name in reshard.VOCAB_ROWS:
                    tensor = reshard.fit_vocab_rows(tensor, rows)
                key = reshard.layout_key(name)
                if key in sharding:
                    tensor = reshard.split_shard(tensor, *sharding[key], tp_rank, tp)
                shard[name] = tensor.clone()  # no view: torch.save would write the whole storage
            for module in sorted({n.rsplit(".", 1)[0] for n in stage} | ({"output_layer"} if pp_rank == pp - 1
                                                                           else set())):
                if module.rsplit(".", 1)[-1] in _LINEAR_MODULES:
                    shard[module + "._extra_state"] = None  # as the model's state_dict has them
            path = layout.shard_path(directory, tp_rank, pp_rank, pp)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save({"model": shard, "iteration": iteration, "config": cfg}, path)
    try:
        fingerprint = TokenizerSpec.of(cfg["data"]).fingerprint()
    except TokenizerError:  # no tokenizer recorded, or its files are gone
        fingerprint = None
    run = {"config": cfg, "datasets": [], "tokenizer_sha256": fingerprint}
    layout.write_run(directory, run)
    layout.write_tracker(out_root, iteration)
    return directory


def _stage_weights(full: dict, pp_rank: int, pp: int, per_stage: int, tied: bool) -> dict:
    """The tensors of pipeline stage `pp_rank` under its local names (layers renumbered from 0)."""
    first, last, offset = pp_rank == 0, pp_rank == pp - 1, pp_rank * per_stage
    stage = {}
    for name, tensor in full.items():
        layer = reshard.layer_index(name)
        if layer is not None:
            if offset <= layer < offset + per_stage:
                stage[reshard.renumber(name, -offset)] = tensor
        elif name.startswith("embedding.") and first or not name.startswith("embedding.") and last:
            stage[name] = tensor
    if tied and last and pp > 1:
        stage[OUTPUT] = full[EMBEDDING]  # megatron-core's last stage holds its own copy of the tied embedding
    return stage
