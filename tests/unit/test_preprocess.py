"""tools/preprocess_data.py: byte-level checks against megatron-core's IndexedDataset reader."""

import json
import os

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from conftest import PYTHON, run
from megatron_patch.data.indexed import read_sidecar
from megatron_patch.data.tokenizer import SentencePieceTokenizer


def _expected(tok, text, k=1):
    ids = tok.tokenize(text) + [tok.eod]
    return ids + [tok.pad] * (-len(ids) % k)


@pytest.mark.parametrize("name,k", [("plain", 1), ("aligned4", 4)])
def test_documents_read_back_as_tokenizer_ids_plus_eod(corpus, name, k):
    tok = SentencePieceTokenizer(corpus["tokenizer"])
    dataset = IndexedDataset(corpus[name])
    assert len(dataset) == len(corpus["texts"])
    assert dataset.index.dtype == numpy.uint16  # vocab < 65500, as Megatron-LM writes it
    for i, text in enumerate(corpus["texts"]):
        assert dataset[i].tolist() == _expected(tok, text, k), f"document {i}"
    meta = read_sidecar(corpus[name])
    assert meta["patch_size"] == k and meta["eod_id"] == tok.eod and meta["pad_id"] == tok.pad
    assert meta["num_documents"] == len(dataset)
    assert meta["num_tokens"] == int(dataset.sequence_lengths.sum())


def test_bin_bytes_are_the_uint16_token_stream(corpus):
    tok = SentencePieceTokenizer(corpus["tokenizer"])
    stream = [i for text in corpus["texts"] for i in _expected(tok, text)]
    with open(corpus["plain"] + ".bin", "rb") as f:
        assert f.read() == numpy.asarray(stream, dtype="<u2").tobytes()


def test_two_workers_write_identical_bytes(corpus, tmp_path):
    prefix = tmp_path / "w2"
    run([PYTHON, "tools/preprocess_data.py", "--input", str(corpus["jsonl"]), "--tokenizer-model",
         corpus["tokenizer"], "--append-eod", "--output-prefix", str(prefix), "--workers", "2"])
    for suffix in (".bin", ".idx"):
        with open(f"{prefix}_text_document{suffix}", "rb") as a, open(corpus["plain"] + suffix, "rb") as b:
            assert a.read() == b.read()


def _bad_input(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"text": "a good document"}\n'
        b'{"text": broken json\n'
        b'{"title": "no text key"}\n'
        b'{"text": "bad utf-8 \xff\xfe"}\n'
        b'{"text": "another good one"}\n'
    )
    return path


def test_malformed_lines_are_skipped_and_reported_with_file_and_line(corpus, tmp_path):
    path = _bad_input(tmp_path)
    result = run([PYTHON, "tools/preprocess_data.py", "--input", str(path), "--tokenizer-model",
                  corpus["tokenizer"], "--append-eod", "--output-prefix", str(tmp_path / "out")])
    for line in (2, 3, 4):
        assert f"{path}:{line}: skipped" in result.stderr
    assert len(IndexedDataset(str(tmp_path / "out_text_document"))) == 2
    assert "3 skipped lines" in result.stdout


def test_strict_mode_fails_without_leaving_outputs(corpus, tmp_path):
    path = _bad_input(tmp_path)
    result = run([PYTHON, "tools/preprocess_data.py", "--input", str(path), "--tokenizer-model",
                  corpus["tokenizer"], "--output-prefix", str(tmp_path / "out"), "--strict"], check=False)
    assert result.returncode != 0
    assert f"{path}:2: skipped" in result.stderr and "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == ["bad.jsonl"]


def test_missing_input_is_a_clear_error(corpus, tmp_path):
    result = run([PYTHON, "tools/preprocess_data.py", "--input", str(tmp_path / "nope.jsonl"), "--tokenizer-model",
                  corpus["tokenizer"], "--output-prefix", str(tmp_path / "out")], check=False)
    assert result.returncode != 0 and "nothing matches" in result.stderr and "Traceback" not in result.stderr
