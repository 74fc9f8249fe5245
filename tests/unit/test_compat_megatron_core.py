"""Each helper of compat/megatron_core.py stands for a real difference between the supported megatron-core
releases: the installed release behaves as the helper says it does (the 3.11 leg runs 0.16, the 3.12 leg 0.19)."""

import inspect

from helpers import PYTHON, run
from megatron_patch.compat.megatron_core import (
    hybrid_api,
    installed_version,
    null_tokenizer_eod_is_last_id,
    sample_tokens,
)
from megatron_patch.data.dataset import build_datasets
from megatron_patch.data.tokenizers.wrappers import SentencePieceTokenizer


def test_sample_query_returns_three_values_from_0_19(megatron_process, corpus, tmp_path):
    tok = SentencePieceTokenizer(corpus["tokenizer"])
    train, _, _ = build_datasets([corpus["aligned4"]], None, "100,0,0", tok, 4, 8, [4, 0, 0], seed=1,
                                 pad_id=tok.pad, cache_path=str(tmp_path), is_built_on_rank=lambda: True)
    returned = train._query_document_sample_shuffle_indices(0)
    assert len(returned) == (3 if installed_version() >= (0, 19) else 2)
    assert (sample_tokens(train, 0) == returned[0]).all() and sample_tokens(train, 0).shape == (9, 4)


def test_hybrid_model_class_and_argument_names_of_this_release():
    api = hybrid_api()
    assert api.model.__name__ == ("HybridModel" if installed_version() >= (0, 18) else "MambaModel")
    parameters = inspect.signature(api.model.__init__).parameters
    assert api.spec_arg in parameters and api.pattern_arg in parameters
    if installed_version() < (0, 17):
        assert "hybrid_layer_pattern" not in parameters


def test_starting_the_trainer_writes_nothing_to_stderr():
    """megatron-core 0.19 imports torch.utils.cpp_extension, whose "No CUDA runtime" line megatron_patch silences
    (the 3.12 leg's torch is a CUDA build without a GPU)."""
    result = run([PYTHON, "-c", "import megatron_patch.cli.pretrain"])
    assert result.stderr == ""


def test_null_tokenizer_eod_moved_into_the_vocabulary_from_0_18():
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    tokenizer = NullTokenizer(1000)
    assert null_tokenizer_eod_is_last_id() == (installed_version() >= (0, 18))
    assert (tokenizer.eod, tokenizer.vocab_size) == ((999, 1000) if null_tokenizer_eod_is_last_id() else (1000, 1001))
