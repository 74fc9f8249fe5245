"""Moving model weights between parallel layouts (TP x PP x virtual PP).

A checkpoint written with one layout is assembled into full, unsharded tensors under GLOBAL names (layer indices
counted over the whole model), and each rank of the new layout takes its slice. Used by the phase hand-off
(`--pretrained-checkpoint` from a run with another layout) and by the parity tests (identical starting weights in
every layout). megatron-core splits a tensor-parallel weight of stride s into s*TP pieces along its partition
dimension and gives rank r the pieces r, r+TP, ... (SwiGLU's fused gate/up weight has stride 2).
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron_patch.checkpoint import layout, storage
from megatron_patch.config.schema import ModelConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")  # padded to a multiple of 128 * TP


def layer_index(name: str) -> Optional[int]:
    """The layer index in a weight name (`decoder.layers.3.mlp...` -> 3), None for the embedding, norm and output."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def renumber(name: str, offset: int) -> str:
    """The name with its layer index (if any) moved by `offset`: local <-> global layer numbering."""
    return _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", name)


def layout_key(name: str) -> str:
    """The name with its layer index removed: every layer has the same sharding."""
    return _LAYER.sub("decoder.layers.N.", name)


def source_layer_offset(num_layers: int, pp: int, vpp: int | None, pp_rank: int, chunk: int) -> int:
    """Global index of the first layer of model chunk `chunk` on pipeline rank `pp_rank` (megatron-core's split)."""
    if vpp is None:
        return pp_rank * num_layers // pp
    per_virtual_stage = num_layers // (pp * vpp)
    return chunk * num_layers // vpp + pp_rank * per_virtual_stage


def sharding_of(model) -> dict:
    """layout key -> (partition_dim, stride) for the tensor-parallel parameters of a model chunk."""
    return {
        layout_key(name): (p.partition_dim, getattr(p, "partition_stride", 1))
        for name, p in model.named_parameters()
        if getattr(p, "tensor_model_parallel", False)
    }


def sharding_for(model: ModelConfig) -> dict:
    """What `sharding_of` gives for a model of this config, without building one (tools that convert checkpoints
    run without megatron-core's process groups): megatron-core's column-parallel weights and biases split along dim
    0 (SwiGLU's fused [gate; up] with stride 2), row-parallel weights along dim 1 (their biases are replicated), the
    vocabulary rows of the embedding and output layer along dim 0. Checked against `sharding_of` by the tests."""
    fc1 = (0, 2 if model.swiglu else 1)
    sharding = {
        "embedding.word_embeddings.weight": (0, 1),
        "decoder.layers.N.self_attention.linear_qkv.weight": (0, 1),
        "decoder.layers.N.self_attention.linear_proj.weight": (1, 1),
        "decoder.layers.N.mlp.linear_fc1.weight": fc1,
        "decoder.layers.N.mlp.linear_fc2.weight": (1, 1),
        # Untied; or tied under pipeline parallelism, where the last stage holds its own copy.
        "output_layer.weight": (0, 1),
    }
    if model.add_bias_linear:
        sharding["decoder.layers.N.self_attention.linear_qkv.bias"] = (0, 1)
        sharding["decoder.layers.N.mlp.linear_fc1.bias"] = fc1
    return sharding


def merge_shards(shards, dim: int, stride: int) -> torch.Tensor:
    """The full tensor from the tensor-parallel shards of ranks 0..TP-1 (inverse of `split_shard`)."""
    tp = len(shards)
    pieces = [shard.chunk(stride, dim) for shard in shards]
    return torch.cat([pieces[i % tp][i // tp] for i in range(stride * tp)], dim)


def split_shard(full: torch.Tensor, dim: int, stride: int, rank: int, tp: int) -> torch.Tensor:
    """Rank `rank`'s slice of a full tensor, as megatron-core shards it (a view when stride is 1: clone to save)."""
    return torch.cat(full.chunk(stride * tp, dim)[rank::tp], dim)


def fit_vocab_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Vocabulary padding depends on TP size; the padded rows are never a target, so cut or zero-extend them."""
    if tensor.size(0) >= rows:
        return tensor[:rows]
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.size(0), *tensor.shape[1:])])


# megatron-core's local layers store their norms under Transformer Engine's names in torch_dist checkpoints.
_NORM_NAMES = {stored: ours
               for ours, stored in get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map.items()}
_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")  # GPTModel's tensors; the rest is optimizer and RNG


def _torch_dist_full_state_dict(checkpoint_dir: str) -> dict:
    """The model tensors of a torch_dist checkpoint, whole, read without a process group: megatron-core stores
    each tensor-parallel weight as one global tensor (SwiGLU's [gate; up] and the key/value groups already in
    one-process order) and the weights of all layers as one tensor with a leading layer axis."""
    storage.check_torch_dist(checkpoint_dir)
    reader = FileSystemReader(checkpoint_dir)
    stored = reader.read_metadata().state_dict_metadata
    wanted = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in stored.items()
              if key.startswith(_MODEL_PREFIXES) and isinstance(meta, TensorStorageMetadata)}
    if not wanted:
        raise FileNotFoundError(f"{checkpoint_dir}: a torch_dist checkpoint without model weights")
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(wanted, storage_reader=reader, no_dist=True)
    full = {}
    for key, tensor in wanted.items():
        if not key.startswith("decoder.layers."):
            full[key] = tensor
            continue
        name = key[len("decoder.layers."):]
        for stored_prefix, our_prefix in _NORM_NAMES.items():
            if name.startswith(stored_prefix):
                name = our_prefix + name[len(stored_prefix):]
        for layer, weight in enumerate(tensor.unbind(0)):
            full[f"decoder.layers.{layer}.{name}"] = weight.clone()
    return full


def full_state_dict(checkpoint_dir: str, sharding: dict) -> dict:
    """All shards of one checkpoint iteration directory (torch_dist or legacy) merged into unsharded tensors with
    global names."""
    if layout.is_torch_dist(checkpoint_dir):
        return _torch_dist_full_state_dict(checkpoint_dir)
    # Directories only: a DeepSpeed checkpoint also holds mp_rank_*_model_states.pt files next to them.
    shard_dirs = [os.path.dirname(f) for f in layout.legacy_shards(checkpoint_dir)]
    if not shard_dirs:
        raise FileNotFoundError(f"{checkpoint_dir}: no mp_rank_*/{layout.SHARD_FILE} shards")
    by_tp: dict = {}  # global name -> {tp_rank: tensor}
    for shard_dir in shard_dirs:
        ranks = os.path.basename(shard_dir).split("_")[2:]
        tp_rank, pp_rank = int(ranks[0]), int(ranks[1]) if len(ranks) > 1 else 0
        state = storage.read(os.path.join(shard_dir, layout.SHARD_FILE))
        parallel, num_layers = state["config"]["parallel"], state["config"]["model"]["num_layers"]
        chunk_keys = sorted(k for k in state if re.fullmatch(r"model\d*", k))
        for chunk, key in enumerate(chunk_keys):
            offset = source_layer_offset(num_layers, parallel["pipeline_model_parallel_size"],
                                         parallel["virtual_pipeline_model_parallel_size"], pp_rank, chunk)
            for name, tensor in state[key].items():
                if isinstance(tensor, torch.Tensor):
                    by_tp.setdefault(renumber(name, offset), {})[tp_rank] = tensor
    full = {}
    for name, shards in by_tp.items():
        ordered = [shards[r] for r in sorted(shards)]
        if layout_key(name) in sharding and len(ordered) > 1:
            full[name] = merge_shards(ordered, *sharding[layout_key(name)])
        else:
            full[name] = ordered[0]
    return full


def load_into(model, full: dict) -> None:
    """Load this rank's slice of `full` (global names, unsharded) into a model chunk."""
    offset = get_transformer_layer_offset(model.config, model.vp_stage)
    sharding = sharding_of(model)
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    local = model.state_dict()
    for name, current in local.items():
        if not isinstance(current, torch.Tensor):
            continue
        global_name = renumber(name, offset)
        tied = model.share_embeddings_and_output_weights
        if tied and global_name == "output_layer.weight" and global_name not in full:
            # Tied embeddings: only a pipeline layout keeps the last stage's copy; one stage has just the embedding.
            global_name = "embedding.word_embeddings.weight"
        if global_name not in full:
            raise KeyError(f"checkpoint has no weight {global_name} (needed as {name} on this rank)")
        tensor = full[global_name]
        if name in VOCAB_ROWS:
            tensor = fit_vocab_rows(tensor, current.size(0) * (tp if name in sharding else 1))
        if layout_key(name) in sharding:
            tensor = split_shard(tensor, *sharding[layout_key(name)], rank, tp)
        if tensor.shape != current.shape:
            raise ValueError(f"{global_name}: checkpoint shape {tuple(tensor.shape)} does not fit "
                             f"{tuple(current.shape)}")
        local[name] = tensor
    model.load_state_dict(local)
