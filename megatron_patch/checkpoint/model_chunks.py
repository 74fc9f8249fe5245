"""This rank's model chunks, built and (from a checkpoint of any layout and format) loaded: the one way the trainer,
evaluation and HF import get a model."""

from __future__ import annotations

from typing import List, Optional

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.checkpoint import reshard, storage
from megatron_patch.config.schema import ModelConfig, ParallelConfig, padded_vocab_size
from megatron_patch.distributed import parallel
from megatron_patch.method.model import PatchGPTModel, build_model


def model_chunks(model: ModelConfig, parallel_config: ParallelConfig, tokenizer_vocab_size: int, patch_size: int,
                 config: TransformerConfig, weights_from: Optional[str] = None) -> List[PatchGPTModel]:
    """One chunk per virtual pipeline stage (one without interleaving), sharing `config`, on this process's device;
    with `weights_from` (a checkpoint iteration directory) its weights resharded into this layout."""
    vocab_size = padded_vocab_size(tokenizer_vocab_size, parallel_config.tensor_model_parallel_size)
    vpp = parallel_config.virtual_pipeline_model_parallel_size
    chunks = [build_model(model, parallel_config, vocab_size, patch_size, config=config,
                          vp_stage=stage if vpp else None, tokenizer_vocab_size=tokenizer_vocab_size)
              for stage in range(vpp or 1)]
    chunks = [chunk.to(parallel.device()) for chunk in chunks]
    if weights_from is not None:
        load_weights(chunks, weights_from)
    return chunks


def load_weights(chunks: List[PatchGPTModel], directory: str) -> None:
    """The weights of the checkpoint in `directory` (any layout, any format) into this rank's chunks."""
    sharding = {key: value for chunk in chunks for key, value in reshard.sharding_of(chunk).items()}
    try:
        full = reshard.full_state_dict(directory, sharding)
    except FileNotFoundError as e:
        raise storage.CheckpointError(f"{directory}: incomplete checkpoint: {e}") from None
    for chunk in chunks:
        reshard.load_into(chunk, full)
