"""The differences between the megatron-core releases this project supports (0.16.x to 0.19.x), one helper each.

Everything else in megatron_patch calls megatron-core's API directly; where two supported releases disagree, the
caller goes through the helper named for the difference here. Each helper says which releases behave which way,
and tests/unit/test_compat_megatron_core.py shows the difference is real on the release that has it.
"""

from __future__ import annotations

import inspect
from importlib.metadata import version
from types import SimpleNamespace

import numpy


def installed_version() -> tuple[int, int]:
    """(major, minor) of the installed megatron-core."""
    return tuple(int(part) for part in version("megatron-core").split(".")[:2])


def sample_tokens(dataset, idx) -> numpy.ndarray:
    """The token ids of sample `idx` of a GPTDataset. `_query_document_sample_shuffle_indices` returns
    (tokens, document ids) up to 0.18 and (tokens, document ids, per-document token counts) from 0.19 on."""
    return dataset._query_document_sample_shuffle_indices(idx)[0]


def hybrid_api() -> SimpleNamespace:
    """megatron-core's hybrid model (a stack of attention "*", MLP "-" and Mamba "M" layers from a pattern). From
    0.18 it is HybridModel / HybridStack (models/hybrid) built from `hybrid_stack_spec`; before, the same model is
    MambaModel / MambaStack (models/mamba, ssm/mamba_block) built from `mamba_stack_spec`. The pattern is
    `hybrid_layer_pattern` from 0.17 and `hybrid_override_pattern` in 0.16 (kept, deprecated, later)."""
    try:
        from megatron.core.models.hybrid.hybrid_block import HybridStack as stack
        from megatron.core.models.hybrid.hybrid_block import HybridStackSubmodules as submodules
        from megatron.core.models.hybrid.hybrid_model import HybridModel as model

        spec_arg = "hybrid_stack_spec"
    except ImportError:
        from megatron.core.models.mamba.mamba_model import MambaModel as model
        from megatron.core.ssm.mamba_block import MambaStack as stack
        from megatron.core.ssm.mamba_block import MambaStackSubmodules as submodules

        spec_arg = "mamba_stack_spec"
    parameters = inspect.signature(model.__init__).parameters
    pattern_arg = "hybrid_layer_pattern" if "hybrid_layer_pattern" in parameters else "hybrid_override_pattern"
    return SimpleNamespace(model=model, stack=stack, submodules=submodules, spec_arg=spec_arg,
                           pattern_arg=pattern_arg)


def null_tokenizer_eod_is_last_id() -> bool:
    """NullTokenizer with --vocab-size N. Up to 0.17: ids 0..N-1, EOD = N, vocab_size N + 1. From 0.18 (its
    NullTokenizer takes an `eod_id`): vocab_size N, EOD = N - 1 (Megatron-LM's --null-tokenizer-eod-id moves it)."""
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    return "eod_id" in inspect.signature(NullTokenizer.__init__).parameters
