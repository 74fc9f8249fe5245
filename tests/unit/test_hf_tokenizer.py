"""SentencePiece models exported as HuggingFace tokenizer files (data/tokenizers/sentencepiece_to_hf.py): AutoTokenizer
gives SentencePiece's ids and decode on the whole Python-docs corpus, on strings chosen to break whitespace handling,
NFKC and byte fallback, and on random Unicode; models it cannot express are refused, naming the feature."""

from __future__ import annotations

import io
import json
import os
import random

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from helpers import PYTHON, run
from megatron_patch.data.tokenizers.sentencepiece_to_hf import TokenizerExportError, check_same_ids, save_hf_tokenizer

transformers = pytest.importorskip("transformers")

HARD = [
    "", " ", "   ", "\t", "\n", " \n\t ", "a", " a", "a ", "  a  b  ", "a\tb\nc", "a\r\nb", "x\r", "\r\n\r\n",
    "ꙮ𓀀",  # byte fallback
    "ｆｕｌｌ", "①②", "ﬁx", "Ⅻ", "⁰¹²", "ǆ", "ﷺ", "㎏", "\u3000a\u3000b",  # NFKC
    "\x00", "\x01a\x02", "a\x7fb", "\x85", "\u200b", "a\u200cb", "a\u200db", "\ufeffabc", "\u2028", "\ufffd",
    "😀🎉👍🏽", "👨‍👩‍👧", "🇺🇸", "<s>", "</s>", "<unk>", "<pad>", "x<s>y", "<0x41>",
    "▁", "▁▁a", " ▁ ", "a▁", "\ue000", "\ue000\ue001", "\ue002", "～", "～\u0301",
    "e\u0301", "ｅ\u0301", "ê\u0301", "ạ\u0302", "a\u0302\u0323", "a\u0316\u0301", "가\u11a8", "\u1100\u1161\u11a8",
    "\u0301abc", "\u0301", " \u0301", "\x01\u0301", "e\x01\u0301", "Å", "\u212b", "ꟲ\u0301", "\U0001e030\u0306",
    "def f(x):\n    return x  # comment\n", "=" * 37, "-" * 80, " " * 10 + "x" + " " * 10,
] + [chr(c) * n for c in range(0x21, 0x7F) for n in (2, 3, 5, 8, 17)]

# Random strings drawn from: ASCII, combining marks, precomposed and compatibility letters, Hangul jamo and
# syllables, controls and odd spaces, characters newer than HF's Unicode data, private use, emoji.
POOLS = [[chr(c) for c in range(lo, hi)] for lo, hi in [
    (0x20, 0x7F), (0x300, 0x370), (0x300, 0x370), (0xC0, 0x250), (0x1E00, 0x1F00), (0xFF01, 0xFF70),
    (0x2460, 0x2500), (0xFB00, 0xFB07), (0x3300, 0x3400), (0x1100, 0x1200), (0xAC00, 0xAC40), (0x0, 0x21),
    (0x2000, 0x2030), (0x1CCD6, 0x1CCFA), (0x1E030, 0x1E06E), (0xA7F1, 0xA7F5), (0x105C0, 0x105F4), (0xE000, 0xE006),
    (0x1F600, 0x1F650), (0x0900, 0x0980), (0x0B80, 0x0C00)]]


def _random_strings(count: int, seed: int = 0):
    rng = random.Random(seed)
    return ["".join(rng.choice(rng.choice(POOLS)) for _ in range(rng.randrange(1, 9))) for _ in range(count)]


def _train(out, name: str, lines, **options) -> str:
    model = io.BytesIO()
    options = {"model_type": "bpe", "vocab_size": 600, "character_coverage": 1.0, "byte_fallback": True,
               "minloglevel": 2, **options}
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, **options)
    path = os.path.join(out, f"{name}.model")
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


def _export(model: str, out) -> str:
    os.makedirs(out, exist_ok=True)
    save_hf_tokenizer(model, str(out))
    return str(out)


def _assert_same(model: str, out: str, texts) -> None:
    """AutoTokenizer gives SentencePiece's ids for every text, and SentencePiece's decode for those ids."""
    sp = spm.SentencePieceProcessor(model_file=model)
    hf = transformers.AutoTokenizer.from_pretrained(out)
    ids = sp.encode(texts)
    for text, want, got in zip(texts, ids, hf(texts, add_special_tokens=False)["input_ids"]):
        assert got == want, f"ids of {text[:60]!r}: {got[:20]} != {want[:20]}"
    for text, want, got in zip(texts, sp.decode(ids), hf.batch_decode(ids)):
        assert got == want, f"decode of {text[:60]!r}: {got[:60]!r} != {want[:60]!r}"


@pytest.fixture(scope="module")
def models(corpus, tmp_path_factory):
    """The whole corpus (536 documents), a 4000-piece BPE trained on it and the 1000-piece one of `corpus`, both
    exported, and mistral-common's LLaMA-2-style 32k BPE (identity normalisation) if installed."""
    out = tmp_path_factory.mktemp("hf_tokenizer")
    full = corpus["dir"] / "full.jsonl"  # conftest's corpus keeps the whole file it took 160 documents from
    if not full.exists():
        full = out / "full.jsonl"
        run([PYTHON, "examples/python_docs_corpus.py", "--output", str(full)])
    run([PYTHON, "tools/train_tokenizer.py", "--input", str(full), "--model-prefix", str(out / "bpe4k"),
         "--vocab-size", "4000"])
    with open(full) as f:
        texts = [json.loads(line)["text"] for line in f]
    found = {"out": out, "texts": texts, "bpe4k": str(out / "bpe4k.model"), "bpe1k": corpus["tokenizer"]}
    try:
        import mistral_common

        found["mistral"] = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    except ImportError:
        pass
    for name in ("bpe4k", "bpe1k", "mistral"):
        if name in found:
            found[f"{name}_hf"] = _export(found[name], out / f"{name}_hf")
    return found


def test_whole_corpus_gives_sentencepiece_ids_and_decode(models):
    # The corpus is the running Python's documentation: 536 documents on 3.11, 500 on 3.12.
    assert len(models["texts"]) >= 500 and sum(map(len, models["texts"])) > 2_000_000
    for name in ("bpe4k", "bpe1k"):
        assert spm.SentencePieceProcessor(model_file=models[name]).get_piece_size() == int(name[3]) * 1000
        _assert_same(models[name], models[f"{name}_hf"], models["texts"])
    with open(os.path.join(models["bpe4k_hf"], "tokenizer_config.json")) as f:
        config = json.load(f)
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert [config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")] == [
        "<s>", "</s>", "<unk>", "<pad>"]
    assert sorted(os.listdir(models["bpe4k_hf"])) == ["special_tokens_map.json", "tokenizer.json",
                                                      "tokenizer.model", "tokenizer_config.json"]
    hf = transformers.AutoTokenizer.from_pretrained(models["bpe4k_hf"])
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, hf.pad_token_id) == (1, 2, 0, 3)
    assert hf("a text")["input_ids"] == hf("a text", add_special_tokens=False)["input_ids"]  # no BOS/EOS added
    assert hf.decode([1, *hf("a text")["input_ids"], 2, 3]) == "a text"  # controls decode to nothing


@pytest.mark.parametrize("name", ["bpe4k", "bpe1k", "mistral"])
def test_hard_and_random_strings(models, name):
    if name not in models:
        pytest.skip("mistral-common is not installed")
    _assert_same(models[name], models[f"{name}_hf"], HARD + _random_strings(3000))


def test_mistral_llama2_model_on_the_whole_corpus(models):
    if "mistral" not in models:
        pytest.skip("mistral-common is not installed")
    proto = model_pb2.ModelProto.FromString(open(models["mistral"], "rb").read())
    assert proto.normalizer_spec.name == "identity" and not proto.normalizer_spec.remove_extra_whitespaces
    _assert_same(models["mistral"], models["mistral_hf"], models["texts"])


@pytest.mark.parametrize("options", [
    {"remove_extra_whitespaces": False},
    {"normalization_rule_name": "identity"},
    {"byte_fallback": False},
    {"add_dummy_prefix": False, "user_defined_symbols": ["<tool>", "@@"]},
], ids=["keep_spaces", "identity", "no_byte_fallback", "user_defined"])
def test_other_sentencepiece_options(models, options, tmp_path):
    lines = [line.strip() for text in models["texts"][:80] for line in text.splitlines() if line.strip()]
    model = _train(tmp_path, "model", lines, **options)
    texts = models["texts"][:40] + HARD + _random_strings(500, seed=1)
    texts += [text.replace(" ", " <tool> ", 3).replace("e", "@@@", 2) for text in texts[:40]]
    _assert_same(model, _export(model, tmp_path / "hf"), texts)


@pytest.mark.parametrize("change, feature", [
    (lambda p: setattr(p.normalizer_spec, "normalization_rule_tsv", "41\t61\n"), "normalization_rule_tsv"),
    (lambda p: setattr(p.normalizer_spec, "name", "nmt_nfkc_cf"), "normalizer 'nmt_nfkc_cf'"),
    (lambda p: setattr(p.trainer_spec, "model_type", model_pb2.TrainerSpec.CHAR), "model_type CHAR"),
    (lambda p: setattr(p.trainer_spec, "model_type", model_pb2.TrainerSpec.UNIGRAM), "model_type UNIGRAM"),
    (lambda p: setattr(p.trainer_spec, "treat_whitespace_as_suffix", True), "treat_whitespace_as_suffix"),
    (lambda p: p.pieces.add(piece="<tool>", type=model_pb2.ModelProto.SentencePiece.USER_DEFINED),
     "user-defined symbols with add_dummy_prefix"),
    (lambda p: setattr(p.pieces[10], "type", model_pb2.ModelProto.SentencePiece.NORMAL),
     "byte_fallback without the 256 byte pieces"),
], ids=["rule_tsv", "case_folding", "char", "unigram", "suffix", "user_defined_prefix", "byte_pieces"])
def test_inexpressible_models_are_refused(corpus, tmp_path, change, feature):
    proto = model_pb2.ModelProto.FromString(open(corpus["tokenizer"], "rb").read())
    change(proto)
    model = tmp_path / "changed.model"
    model.write_bytes(proto.SerializeToString())
    out = tmp_path / "hf"
    out.mkdir()
    with pytest.raises(TokenizerExportError) as error:
        save_hf_tokenizer(str(model), str(out))
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{model}: ") and feature in message, message
    assert os.listdir(out) == []


def test_check_same_ids_names_the_first_text_that_differs(models):
    texts = ["", "same everywhere? no: another vocabulary", *models["texts"][:3]]
    with pytest.raises(TokenizerExportError) as error:
        check_same_ids(models["bpe4k"], models["bpe1k_hf"], texts)
    message = str(error.value)
    assert "\n" not in message and "text 1 ('same everywhere? no: another vocabulary')" in message, message
    check_same_ids(models["bpe4k"], models["bpe4k_hf"], iter(models["texts"][:100]))  # texts may be a stream
