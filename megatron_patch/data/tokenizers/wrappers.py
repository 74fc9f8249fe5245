"""The tokenizers of Megatron-LM's --tokenizer-type (config/tokenizer.py: the flags, checks and fingerprint), one
interface for preprocessing, the trainer, evaluation and export: `tokenize`/`tokenize_batch` (ids, no BOS/EOS),
`detokenize`, `vocab_size`, `eod`, `pad` (-1 when the tokenizer has none: --pad-id), `unique_identifiers` (the shape
megatron-core's datasets expect), `fingerprint`, `piece_byte_lengths` (bits per byte), `hf_special_ids` and
`save_hf` (export). `build_tokenizer(spec)` makes one. (Not derived from megatron-core's deprecated
MegatronLegacyTokenizer, which only adds a warning per process.)

- SentencePiece (SentencePieceTokenizer, GPTSentencePieceTokenizer, Llama2Tokenizer): the sentencepiece library.
- HuggingFaceTokenizer and GPT2BPETokenizer: the `tokenizers` library (Rust; batches encoded in parallel) on the
  tokenizer.json, or on a byte-level BPE built from vocab.json + merges.txt as GPT-2's tokenizer is.
- NullTokenizer: text is space-separated ids.
No torch and no transformers: preprocessing imports this module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import sentencepiece as spm

from megatron_patch.compat.megatron_core import null_tokenizer_eod_is_last_id
from megatron_patch.config.tokenizer import SENTENCEPIECE_TYPES, TokenizerError, TokenizerSpec, file_sha256

# What a tokenizer raises for a text it cannot encode (a lone surrogate, a NullTokenizer text that is not ids).
TOKENIZE_ERRORS = (TypeError, RuntimeError, UnicodeError, ValueError)


def model_sha256(model_path: str) -> str:
    """Fingerprint of a tokenizer model file (dataset sidecars and checkpoints record it; paths may move)."""
    return file_sha256(model_path)


def build_tokenizer(spec: TokenizerSpec):
    """The tokenizer a spec names (checked first: TokenizerError, one line, for flags or files that do not fit)."""
    spec = spec.resolved()
    if spec.type in SENTENCEPIECE_TYPES:
        tokenizer = SentencePieceTokenizer(spec.tokenizer_model)
    elif spec.type == "HuggingFaceTokenizer":
        tokenizer = HuggingFaceTokenizer(spec.tokenizer_model, spec.tokenizer_hf_include_special_tokens)
    elif spec.type == "GPT2BPETokenizer":
        tokenizer = GPT2BPETokenizer(spec.vocab_file, spec.merge_file)
    else:
        tokenizer = NullTokenizer(spec.vocab_size)
    tokenizer.spec = spec
    return tokenizer


class Tokenizer:
    """What every type provides besides its constructor; `spec` is set by build_tokenizer (or the constructor)."""

    spec: TokenizerSpec
    pad: int = -1
    unique_identifiers: OrderedDict  # part of megatron-core's dataset cache key: never reused for another tokenizer

    @property
    def fingerprint(self) -> str:
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = self.spec.fingerprint()
        return self._fingerprint

    def tokenize(self, text: str) -> List[int]:
        return self.tokenize_batch([text])[0]

    def hf_special_ids(self) -> Dict[str, Optional[int]]:
        """bos/eos/pad ids for an HF model config (None when absent)."""
        return {"bos_token_id": None, "eos_token_id": self.eod, "pad_token_id": self.pad if self.pad >= 0 else None}


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model not found: {model_path}")
        self.spec = TokenizerSpec("SentencePieceTokenizer", model_path).resolved()
        self.model_path = model_path
        # Part of megatron-core's dataset cache key: samples built for one tokenizer are never reused for another.
        self.unique_identifiers = OrderedDict(class_=type(self).__name__, tokenizer_path=[os.path.abspath(model_path)])
        try:
            self._sp = spm.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"--tokenizer-model {model_path}: not a SentencePiece model ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def vocab(self):
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

    @property
    def inv_vocab(self):
        return {i: self._sp.id_to_piece(i) for i in range(self.vocab_size)}

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    @property
    def pad(self) -> int:
        """The model's pad id, or -1 when it has none."""
        return self._sp.pad_id()

    def tokenize(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str], num_threads: int = 1) -> List[List[int]]:
        return self._sp.encode(list(texts), num_threads=num_threads)

    def piece_byte_lengths(self) -> List[int]:
        """UTF-8 bytes each id stands for in text: a piece's characters with its "▁" as a space, one byte for a
        byte-fallback piece, none for control ids (EOD, pad). What bits per byte of tokenized data count."""
        sp = self._sp

        def length(i: int) -> int:
            if sp.is_control(i):
                return 0
            return 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode())

        return [length(i) for i in range(self.vocab_size)]

    def detokenize(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def hf_special_ids(self) -> Dict[str, Optional[int]]:
        ids = {"bos_token_id": self._sp.bos_id(), "eos_token_id": self._sp.eos_id(), "pad_token_id": self._sp.pad_id()}
        return {key: (i if i >= 0 else None) for key, i in ids.items()}

    def save_hf(self, out_dir: str) -> None:
        """The HF tokenizer files giving these ids (sentencepiece_to_hf.py; TokenizerExportError when none can)."""
        from megatron_patch.data.tokenizers.sentencepiece_to_hf import save_hf_tokenizer

        save_hf_tokenizer(self.model_path, out_dir)


_PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]


def _byte_alphabet(printable) -> Dict[int, str]:
    """GPT-2's byte-level alphabet: the character standing for each byte in byte-level BPE tokens."""
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class FastTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (Rust): batches are encoded in parallel threads (encode_batch_fast)."""

    def _setup(self, backend, eod: Optional[int], pad: Optional[int], bos: Optional[int], include_special: bool,
               name: str):
        self._tok = backend
        self._include_special = include_special
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        if eod is None:
            raise TokenizerError(f"{name}: no end-of-document token (set eos_token in tokenizer_config.json)")
        self.eod, self.pad, self._bos = eod, (-1 if pad is None else pad), bos
        self._special = {i for i, token in backend.get_added_tokens_decoder().items() if token.special}
        self.unique_identifiers = OrderedDict(class_=type(self).__name__, tokenizer_sha256=[self.fingerprint])

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=self._include_special).ids

    def tokenize_batch(self, texts: Sequence[str], num_threads: int = 1) -> List[List[int]]:
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=self._include_special)]

    def detokenize(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def piece_byte_lengths(self) -> List[int]:
        """UTF-8 bytes each id stands for: exact for byte-level BPE (GPT-2, LLaMA-3, Qwen) and byte-fallback
        pieces, a piece's characters ("\u2581" as a space) otherwise; none for special tokens."""
        decoder = json.loads(self._tok.to_str()).get("decoder") or {}
        byte_level = "ByteLevel" in json.dumps(decoder)
        alphabet = {c: b for b, c in _byte_alphabet(_PRINTABLE).items()}

        def length(i: int) -> int:
            token = self._tok.id_to_token(i)
            if token is None or i in self._special:
                return 0
            if BYTE_FALLBACK.fullmatch(token):
                return 1
            if byte_level and all(c in alphabet for c in token):
                return len(token)
            return len(token.replace("\u2581", " ").encode())

        return [length(i) for i in range(self.vocab_size)]

    def hf_special_ids(self) -> Dict[str, Optional[int]]:
        return dict(super().hf_special_ids(), bos_token_id=self._bos)


def _token_content(value) -> Optional[str]:
    return value.get("content") if isinstance(value, dict) else value


EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")  # a bare tokenizer.json: the first present


class HuggingFaceTokenizer(FastTokenizer):
    """A HuggingFace fast tokenizer (tokenizer.json, or a directory holding one) loaded with the `tokenizers`
    library. The special tokens come from tokenizer_config.json / special_tokens_map.json beside it, as
    transformers reads them: EOD = eos_token (Megatron-LM's eod), pad = pad_token. A bare tokenizer.json has no
    such file: EOD is then the first of <|endoftext|>, </s>, <|end_of_text|>, <eos> that is a special token.
    vocab_size counts the added tokens (len(AutoTokenizer), as megatron-core counts it)."""

    def __init__(self, path: str, include_special_tokens: bool = False):
        from tokenizers import Tokenizer as Backend

        self.spec = TokenizerSpec("HuggingFaceTokenizer", path,
                                  tokenizer_hf_include_special_tokens=include_special_tokens).resolved()
        files = self.spec.hf_files()
        self.files = files
        try:
            backend = Backend.from_file(files["tokenizer.json"])
        except Exception as e:  # the tokenizers library raises plain Exception
            raise TokenizerError(f"--tokenizer-model {files['tokenizer.json']}: not a tokenizer.json ({e})") from None
        self.special_tokens = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if name in files:
                with open(files[name]) as f:
                    config = json.load(f)
                for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
                    if _token_content(config.get(key)) is not None:
                        self.special_tokens[key] = _token_content(config[key])
        if "eos_token" not in self.special_tokens and not any(n in files for n in ("tokenizer_config.json",)):
            added = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
            found = next((c for c in EOD_CANDIDATES if c in added), None)
            if found:
                self.special_tokens["eos_token"] = found
        ids = {key: backend.token_to_id(token) for key, token in self.special_tokens.items()}
        for key, token in self.special_tokens.items():
            if ids[key] is None:
                raise TokenizerError(f"--tokenizer-model {path}: its {key} {token!r} is not in the vocabulary")
        self._setup(backend, ids.get("eos_token"), ids.get("pad_token"), ids.get("bos_token"), include_special_tokens,
                    f"--tokenizer-model {path}")

    def save_hf(self, out_dir: str) -> None:
        """tokenizer.json and the configuration files (written when the tokenizer came without them)."""
        for name, path in self.files.items():
            shutil.copyfile(path, os.path.join(out_dir, name))
        if "tokenizer_config.json" not in self.files:
            _write_tokenizer_config(out_dir, self.special_tokens)


def _write_tokenizer_config(out_dir: str, special_tokens: Dict[str, str]) -> None:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30, **special_tokens}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)


class GPT2BPETokenizer(FastTokenizer):
    """GPT-2's byte-level BPE from vocab.json and merges.txt (Megatron-LM's GPT2BPETokenizer; megatron-core 0.16
    wraps transformers' GPT-2 tokenizer): EOD = <|endoftext|>, no pad, vocab_size = the vocab.json entries."""

    EOD = "<|endoftext|>"

    def __init__(self, vocab_file: str, merge_file: str):
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as Backend

        self.spec = TokenizerSpec("GPT2BPETokenizer", vocab_file=vocab_file, merge_file=merge_file).resolved()
        try:
            backend = Backend(models.BPE.from_file(vocab_file, merge_file))
        except Exception as e:  # the tokenizers library raises plain Exception
            raise TokenizerError(f"--vocab-file {vocab_file} / --merge-file {merge_file}: not GPT-2 BPE files "
                                 f"({e})") from None
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        eod = backend.token_to_id(self.EOD)
        if eod is None:
            raise TokenizerError(f"--vocab-file {vocab_file}: no {self.EOD} token (GPT2BPETokenizer's EOD)")
        backend.add_special_tokens([AddedToken(self.EOD, special=True)])  # as transformers' GPT-2 tokenizer
        self._setup(backend, eod, None, eod, False, f"--vocab-file {vocab_file}")

    def save_hf(self, out_dir: str) -> None:
        self._tok.save(os.path.join(out_dir, "tokenizer.json"))
        shutil.copyfile(self.spec.vocab_file, os.path.join(out_dir, "vocab.json"))
        shutil.copyfile(self.spec.merge_file, os.path.join(out_dir, "merges.txt"))
        _write_tokenizer_config(out_dir, {"bos_token": self.EOD, "eos_token": self.EOD, "unk_token": self.EOD})


class NullTokenizer(Tokenizer):
    """Megatron-LM's NullTokenizer as the installed megatron-core has it: the text is ids separated by single
    spaces, each below --vocab-size N; no pad. EOD = N and vocab_size N + 1 up to 0.17, EOD = N - 1 and vocab_size N
    from 0.18 (compat.megatron_core.null_tokenizer_eod_is_last_id)."""

    def __init__(self, vocab_size: int):
        self.spec = TokenizerSpec("NullTokenizer", vocab_size=vocab_size).resolved()
        self._n = int(vocab_size)
        self._eod_in_range = null_tokenizer_eod_is_last_id()
        self.eod = self._n - 1 if self._eod_in_range else self._n
        self.unique_identifiers = OrderedDict(class_=type(self).__name__, vocab_size=self._n)

    @property
    def vocab_size(self) -> int:
        return self._n if self._eod_in_range else self._n + 1

    def tokenize(self, text: str) -> List[int]:
        ids = [int(x) for x in text.split(" ")]
        bad = next((i for i in ids if not 0 <= i < self._n), None)
        if bad is not None:
            raise ValueError(f"id {bad} is outside NullTokenizer's 0..{self._n - 1}")
        return ids

    def tokenize_batch(self, texts: Sequence[str], num_threads: int = 1) -> List[List[int]]:
        return [self.tokenize(text) for text in texts]

    def detokenize(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

    def piece_byte_lengths(self) -> List[int]:
        """The text's bytes per id: its digits and a space."""
        return [len(str(i)) + 1 for i in range(self.vocab_size)]

    def save_hf(self, out_dir: str) -> None:
        raise TokenizerError("NullTokenizer has no text form to export as a HuggingFace tokenizer")
