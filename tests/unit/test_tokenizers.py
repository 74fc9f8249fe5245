"""Every --tokenizer-type end to end: tools/preprocess_data.py writes the bytes Megatron-LM's pipeline writes with
megatron-core's tokenizer of that type, patch-aligned output, int32 datasets past 65,535 ids, one-line errors for a
tokenizer that does not fit its type, the fingerprint, and training (and a refused resume) on an HF-tokenized
dataset, exported to HF and imported back. The tokenizers are built offline: a byte-level BPE trained here
(tools/train_tokenizer.py --type bpe), GPT-2 vocab.json/merges.txt written from it, and NullTokenizer ids from it."""

import hashlib
import json
import shutil

import numpy
import pytest
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder
from megatron.core.tokenizers import MegatronTokenizer, megatron_tokenizer

from helpers import PYTHON, ROOT, phase_flags, run
from megatron_patch.checkpoint import guards
from megatron_patch.cli import import_hf
from megatron_patch.config.tokenizer import TokenizerSpec
from megatron_patch.data.indexed import read_sidecar
from megatron_patch.data.tokenizers.wrappers import build_tokenizer

PREPROCESS = "tools/preprocess_data.py"
EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def tokenizers_dir(corpus, tmp_path_factory):
    """A 1000-token byte-level BPE trained on the corpus (HF directory), GPT-2 files written from it, a
    megatron-core-loadable GPT-2 directory for the reference, and the corpus as NullTokenizer text."""
    out = tmp_path_factory.mktemp("tokenizers")
    run([PYTHON, "tools/train_tokenizer.py", "--type", "bpe", "--input", str(corpus["jsonl"]), "--model-prefix",
         str(out / "bpe"), "--vocab-size", "1000"])
    model = json.load(open(out / "bpe" / "tokenizer.json"))["model"]
    gpt2 = out / "gpt2"
    gpt2.mkdir()
    (gpt2 / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    (gpt2 / "merges.txt").write_text("#version: 0.2\n" + "".join(" ".join(pair) + "\n" for pair in model["merges"]))
    # transformers' GPT-2 tokenizer on these files: what megatron-core 0.16's GPT2BPETokenizer wraps (it would fetch
    # the hub's "gpt2" config first, which cannot be done offline).
    (gpt2 / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT}))
    bpe = build_tokenizer(TokenizerSpec(tokenizer_model=str(out / "bpe")))
    null_lines = [json.dumps({"text": " ".join(map(str, bpe.tokenize(text)))}) + "\n" for text in corpus["texts"]]
    (out / "ids.jsonl").write_text("".join(null_lines))
    return out


def flags_for(kind, d, vocab_size=1000):
    return {"HuggingFaceTokenizer": ["--tokenizer-type", kind, "--tokenizer-model", str(d / "bpe")],
            "GPT2BPETokenizer": ["--tokenizer-type", kind, "--vocab-file", str(d / "gpt2" / "vocab.json"),
                                 "--merge-file", str(d / "gpt2" / "merges.txt")],
            "NullTokenizer": ["--tokenizer-type", kind, "--vocab-size", str(vocab_size)]}[kind]


def spec_for(kind, d, vocab_size=1000):
    return {"HuggingFaceTokenizer": TokenizerSpec(kind, str(d / "bpe")),
            "GPT2BPETokenizer": TokenizerSpec(kind, vocab_file=str(d / "gpt2" / "vocab.json"),
                                              merge_file=str(d / "gpt2" / "merges.txt")),
            "NullTokenizer": TokenizerSpec(kind, vocab_size=vocab_size)}[kind]


# megatron-core's library name for NullTokenizer: "null" in 0.16, "null-text" in 0.19 (its TEXT_LIBRARIES).
NULL_LIBRARY = "null-text" if "null-text" in getattr(megatron_tokenizer, "TEXT_LIBRARIES", ()) else "null"


def megatron_core_tokenizer(kind, d, vocab_size=1000):
    """megatron-core 0.16's tokenizer as Megatron-LM's tools/preprocess_data.py builds it (build_tokenizer)."""
    if kind == "NullTokenizer":
        return MegatronTokenizer.from_pretrained(metadata_path={"library": NULL_LIBRARY}, vocab_size=vocab_size)
    common = dict(metadata_path={"library": "huggingface"}, use_fast=False, include_special_tokens=False,
                  additional_special_tokens=[])
    if kind == "HuggingFaceTokenizer":
        return MegatronTokenizer.from_pretrained(tokenizer_path=str(d / "bpe"), **common)
    return MegatronTokenizer.from_pretrained(tokenizer_path=str(d / "gpt2"), vocab_file=str(d / "gpt2" / "vocab.json"),
                                             merges_file=str(d / "gpt2" / "merges.txt"), **common)


def megatron_lm_dataset(tokenizer, jsonl, prefix):
    """Megatron-LM's Encoder.encode loop (--append-eod, no sentence splitting) over `tokenizer`, into megatron-core's
    IndexedDatasetBuilder with its dtype rule: what its tools/preprocess_data.py writes."""
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(tokenizer.vocab_size))
    for line in open(jsonl):
        ids = tokenizer.tokenize(json.loads(line)["text"])
        if ids:
            ids = ids + [tokenizer.eod]
        builder.add_document(ids, [len(ids)] if ids else [])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def preprocess(inputs, prefix, *flags, check=True):
    return run([PYTHON, PREPROCESS, "--input", str(inputs), "--output-prefix", str(prefix), "--append-eod",
                "--log-interval", "0", *flags], check=check)


def same_bytes(prefix_a, prefix_b):
    return all(open(prefix_a + s, "rb").read() == open(prefix_b + s, "rb").read() for s in (".bin", ".idx"))


@pytest.mark.parametrize("kind,vocab_size,workers", [
    ("HuggingFaceTokenizer", None, 1), ("HuggingFaceTokenizer", None, 2), ("GPT2BPETokenizer", None, 1),
    ("NullTokenizer", 1000, 1), ("NullTokenizer", 70000, 1)])
def test_bytes_equal_megatron_lm_output(corpus, tokenizers_dir, tmp_path, kind, vocab_size, workers):
    d = tokenizers_dir
    jsonl = d / "ids.jsonl" if kind == "NullTokenizer" else corpus["jsonl"]
    megatron = megatron_core_tokenizer(kind, d, vocab_size)
    reference = megatron_lm_dataset(megatron, jsonl, tmp_path / "megatron")
    preprocess(jsonl, tmp_path / "ours", *flags_for(kind, d, vocab_size), "--workers", str(workers))
    ours = str(tmp_path / "ours_text_document")
    assert same_bytes(ours, reference)
    dataset = IndexedDataset(ours)
    assert dataset.index.dtype == (numpy.int32 if vocab_size == 70000 else numpy.uint16)
    meta = read_sidecar(ours)
    # NullTokenizer N: vocab N + 1 and EOD N in megatron-core 0.16, vocab N and EOD N - 1 from 0.18.
    assert meta["tokenizer_type"] == kind and meta["vocab_size"] == megatron.vocab_size
    assert meta["eod_id"] == megatron.eod
    if kind != "NullTokenizer":
        assert meta["vocab_size"] == 1000 and meta["eod_id"] == 0  # <|endoftext|> is id 0 of the trained BPE


@pytest.mark.parametrize("kind", ["HuggingFaceTokenizer", "GPT2BPETokenizer", "NullTokenizer"])
def test_patch_aligned_output(corpus, tokenizers_dir, tmp_path, kind):
    d = tokenizers_dir
    jsonl = d / "ids.jsonl" if kind == "NullTokenizer" else corpus["jsonl"]
    flags = flags_for(kind, d)
    tokenizer = build_tokenizer(spec_for(kind, d))
    if tokenizer.pad < 0:  # GPT-2 and NullTokenizer have no pad: a one-line error, then --pad-id
        result = preprocess(jsonl, tmp_path / "out", *flags, "--patch-size", "4", check=False)
        assert result.returncode != 0 and "has no pad id" in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())
        flags += ["--pad-id", "5"]
    pad = tokenizer.pad if tokenizer.pad >= 0 else 5
    preprocess(jsonl, tmp_path / "out", *flags, "--patch-size", "4")
    dataset = IndexedDataset(str(tmp_path / "out_text_document"))
    texts = [json.loads(line)["text"] for line in open(jsonl)]
    for i, text in enumerate(texts[:40]):
        ids = tokenizer.tokenize(text) + [tokenizer.eod]
        expected = ids + [pad] * (-len(ids) % 4)
        assert dataset[i].tolist() == expected and len(expected) % 4 == 0
    assert read_sidecar(str(tmp_path / "out_text_document"))["pad_id"] == pad


@pytest.mark.parametrize("flags,message", [
    (lambda d, c: ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                   str(d / "bpe" / "tokenizer.json")],
     "is a JSON file (a HuggingFace tokenizer?), not a SentencePiece model: pass --tokenizer-type "
     "HuggingFaceTokenizer"),
    (lambda d, c: ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(d / "gpt2" / "vocab.json")],
     "--tokenizer-type GPT2BPETokenizer needs --vocab-file (vocab.json) and --merge-file (merges.txt): "
     "--merge-file missing"),
    (lambda d, c: ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", c["tokenizer"]],
     "is not a tokenizer.json (a SentencePiece model? pass --tokenizer-type SentencePieceTokenizer)"),
    (lambda d, c: ["--tokenizer-type", "NullTokenizer"], "--tokenizer-type NullTokenizer needs --vocab-size N"),
    (lambda d, c: ["--tokenizer-type", "NullTokenizer", "--vocab-size", "10", "--tokenizer-model", c["tokenizer"]],
     "--tokenizer-type NullTokenizer does not read --tokenizer-model"),
], ids=["json-as-sentencepiece", "gpt2-without-merges", "model-as-hf", "null-without-size", "null-with-model"])
def test_tokenizer_that_does_not_fit_its_type_is_one_line(corpus, tokenizers_dir, tmp_path, flags, message):
    result = preprocess(corpus["jsonl"], tmp_path / "out", *flags(tokenizers_dir, corpus), check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"preprocess_data.py: error: {result.stderr.split('error: ')[1]}"
                                                  .strip()] and message in result.stderr
    assert not list(tmp_path.iterdir())


def test_fingerprints_tell_every_tokenizer_apart(corpus, tokenizers_dir, tmp_path):
    d = tokenizers_dir
    specs = {
        "sp": TokenizerSpec(tokenizer_model=corpus["tokenizer"]),
        "hf": TokenizerSpec(tokenizer_model=str(d / "bpe")),
        "gpt2": TokenizerSpec("GPT2BPETokenizer", vocab_file=str(d / "gpt2" / "vocab.json"),
                              merge_file=str(d / "gpt2" / "merges.txt")),
        "null": TokenizerSpec("NullTokenizer", vocab_size=1000),
        "null2": TokenizerSpec("NullTokenizer", vocab_size=1001),
        "hf+special": TokenizerSpec(tokenizer_model=str(d / "bpe"), tokenizer_hf_include_special_tokens=True),
    }
    prints = {name: spec.fingerprint() for name, spec in specs.items()}
    assert len(set(prints.values())) == len(prints)
    # A SentencePiece model's fingerprint is still its file's sha256 (checkpoints written before stay resumable).
    assert prints["sp"] == hashlib.sha256(open(corpus["tokenizer"], "rb").read()).hexdigest()
    # The same HF tokenizer named by its directory or its tokenizer.json; a copy elsewhere is the same tokenizer.
    assert TokenizerSpec(tokenizer_model=str(d / "bpe" / "tokenizer.json")).fingerprint() == prints["hf"]
    shutil.copytree(d / "bpe", tmp_path / "moved")
    assert TokenizerSpec(tokenizer_model=str(tmp_path / "moved")).fingerprint() == prints["hf"]
    config = tmp_path / "moved" / "tokenizer_config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), eos_token="<|pad|>")))  # another EOD
    assert TokenizerSpec(tokenizer_model=str(tmp_path / "moved")).fingerprint() != prints["hf"]


def test_trains_from_hf_dataset_and_refuses_resume_with_another_tokenizer(corpus, tokenizers_dir, tmp_path, capsys):
    d = tokenizers_dir
    preprocess(corpus["jsonl"], tmp_path / "hf", "--tokenizer-model", str(d / "bpe"), "--patch-size", "4")
    data = ["--data-path", str(tmp_path / "hf_text_document"), "--tokenizer-model", str(d / "bpe")]
    ckpt = ["--save", str(tmp_path / "ckpt"), "--load", str(tmp_path / "ckpt")]
    result = run([PYTHON, f"{ROOT}/pretrain_patch_gpt.py", *phase_flags(corpus, tmp_path, 4, [*data, *ckpt], steps=3)])
    assert "iteration      3/3" in result.stdout
    run_json = json.load(open(tmp_path / "ckpt" / "iter_0000003" / "run.json"))
    assert run_json["tokenizer_sha256"] == TokenizerSpec(tokenizer_model=str(d / "bpe")).fingerprint()
    # Export writes the HF tokenizer the run used: AutoTokenizer gives the training ids.
    run([PYTHON, "tools/export_hf.py", str(tmp_path / "ckpt"), str(tmp_path / "hf")])
    from transformers import AutoTokenizer

    exported = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ours = build_tokenizer(TokenizerSpec(tokenizer_model=str(d / "bpe")))
    assert all(exported(text, add_special_tokens=False)["input_ids"] == ours.tokenize(text)
               for text in corpus["texts"][:20])
    assert json.load(open(tmp_path / "hf" / "config.json"))["eos_token_id"] == ours.eod
    # ... and import_hf.py takes that directory back with its tokenizer.json: the same weights, the tokenizer
    # recorded as HuggingFaceTokenizer (the hand-off guard's fingerprint), the flags to train from it.
    import_hf.main([str(tmp_path / "hf"), str(tmp_path / "imported")])
    printed = capsys.readouterr().out
    assert f"--tokenizer-type HuggingFaceTokenizer --tokenizer-model {tmp_path / 'hf'}" in printed
    imported = guards.locate(str(tmp_path / "imported"))
    assert imported.config["data"]["tokenizer_type"] == "HuggingFaceTokenizer"
    hf_tokenizer = TokenizerSpec("HuggingFaceTokenizer", str(tmp_path / "hf"))
    assert imported.run["tokenizer_sha256"] == hf_tokenizer.fingerprint()
    trained = guards.locate(str(tmp_path / "ckpt")).full_weights()
    for name, tensor in imported.full_weights().items():
        assert torch.equal(tensor[:ours.vocab_size], trained[name][:ours.vocab_size]), name
    other = [*data[:2], "--tokenizer-model", corpus["tokenizer"]]  # the SentencePiece model: the same 1000 ids
    result = run([PYTHON, f"{ROOT}/pretrain_patch_gpt.py", *phase_flags(corpus, tmp_path, 4, [*other, *ckpt], steps=4)],
                 check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "a different tokenizer (HuggingFaceTokenizer; this run: SentencePieceTokenizer" in result.stderr
