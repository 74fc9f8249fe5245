"""Which tokenizer a run uses: Megatron-LM's --tokenizer-type and the flags each type reads, checked without loading
anything (no tokenizer library, no torch), and its fingerprint. megatron_patch.data.tokenizers.wrappers builds the
tokenizer.

| --tokenizer-type | defined by | EOD | vocabulary |
|---|---|---|---|
| SentencePieceTokenizer, GPTSentencePieceTokenizer, Llama2Tokenizer | --tokenizer-model X.model | eos id | pieces |
| HuggingFaceTokenizer | --tokenizer-model tokenizer.json or an HF directory | eos_token | with added tokens |
| GPT2BPETokenizer | --vocab-file vocab.json --merge-file merges.txt | <|endoftext|> | vocab.json entries |
| NullTokenizer | --vocab-size N (text: space-separated ids < N) | N | N + 1 |

The three SentencePiece names behave alike, as in megatron-core 0.16's tokenizers (what Megatron-LM's
tools/preprocess_data.py builds): ids without BOS/EOS, EOD = the model's eos id. HuggingFaceTokenizer adds no special
tokens unless --tokenizer-hf-include-special-tokens (megatron-core 0.16's default; from 0.17 Megatron-LM adds them by
default). Without --tokenizer-type the type follows --tokenizer-model: a `.model` file is SentencePiece, a `.json`
file or a directory HuggingFace.

The fingerprint (dataset sidecars, checkpoints, resume and hand-off guards) is the sha256 of a SentencePiece model
file (as before this module), else the sha256 of the type and the sha256 of each file that defines the tokenizer
(NullTokenizer: its vocabulary size).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Dict, Optional

from megatron_patch.errors import MegatronPatchError

SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
TOKENIZER_TYPES = (*SENTENCEPIECE_TYPES, "HuggingFaceTokenizer", "GPT2BPETokenizer", "NullTokenizer")
HF_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # read (and fingerprinted) when present

# (flag, field of DataConfig / argparse dest, help, argparse kwargs): the trainer's table (flags.py) and the tools'
# parsers (add_tokenizer_arguments) both use these.
TOKENIZER_FLAGS = [
    ("--tokenizer-type", "tokenizer_type",
     "Megatron-LM's tokenizer type (default: SentencePieceTokenizer for a .model, HuggingFaceTokenizer for a "
     ".json file or a directory)", dict(choices=TOKENIZER_TYPES)),
    ("--tokenizer-model", "tokenizer_model",
     "SentencePiece .model, or HuggingFace tokenizer.json / local tokenizer directory", dict()),
    ("--vocab-file", "vocab_file", "GPT2BPETokenizer: vocab.json", dict()),
    ("--merge-file", "merge_file", "GPT2BPETokenizer: merges.txt", dict()),
    ("--vocab-size", "vocab_size",
     "NullTokenizer: ids 0..N-1; EOD is N (megatron-core <= 0.17) or N-1 (>= 0.18)", dict(type=int)),
    ("--tokenizer-hf-include-special-tokens", "tokenizer_hf_include_special_tokens",
     "HuggingFaceTokenizer: add the tokenizer's special tokens (e.g. BOS) to every text", dict(action="store_true")),
]
FIELDS = tuple(field for _, field, _, _ in TOKENIZER_FLAGS)
TOKENIZER_FILES = ("tokenizer_model", "vocab_file", "merge_file")  # the fields that name files


class TokenizerError(MegatronPatchError, ValueError):
    """A tokenizer that cannot be used as given: one line naming the flag."""


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _looks_like_json(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(64).lstrip()[:1] == b"{"


@dataclass(frozen=True)
class TokenizerSpec:
    """The tokenizer flags of a run. `resolved()` infers the type and checks the flags and files."""

    tokenizer_type: Optional[str] = None
    tokenizer_model: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    vocab_size: Optional[int] = None
    tokenizer_hf_include_special_tokens: bool = False

    @classmethod
    def of(cls, obj) -> "TokenizerSpec":
        """The spec of anything holding the fields (a DataConfig, parsed arguments, a saved config's dict)."""
        get = obj.get if isinstance(obj, dict) else (lambda name, default=None: getattr(obj, name, default))
        return cls(**{f.name: get(f.name, f.default) for f in dataclasses.fields(cls)})

    @property
    def type(self) -> str:
        if self.tokenizer_type:
            return self.tokenizer_type
        model = self.tokenizer_model
        if model and (model.endswith(".json") or os.path.isdir(model)):
            return "HuggingFaceTokenizer"
        if model:
            return "SentencePieceTokenizer"
        if self.vocab_file and self.merge_file:  # Megatron-LM's GPT scripts give only these
            return "GPT2BPETokenizer"
        raise TokenizerError("no tokenizer: give --tokenizer-model, or --tokenizer-type with its files")

    def resolved(self) -> "TokenizerSpec":
        """This spec with its type filled in, after checking the flags it needs and their files."""
        kind = self.type
        if kind not in TOKENIZER_TYPES:
            raise TokenizerError(f"--tokenizer-type {kind}: not supported (one of {', '.join(TOKENIZER_TYPES)})")
        needed = {"GPT2BPETokenizer": ("vocab_file", "merge_file"), "NullTokenizer": ("vocab_size",)}.get(
            kind, ("tokenizer_model",))
        missing = [f"--{name.replace('_', '-')}" for name in needed if getattr(self, name) is None]
        if missing:
            what = {"GPT2BPETokenizer": "--vocab-file (vocab.json) and --merge-file (merges.txt)",
                    "NullTokenizer": "--vocab-size N"}.get(kind, "--tokenizer-model")
            raise TokenizerError(f"--tokenizer-type {kind} needs {what}: {' and '.join(missing)} missing")
        unused = [f"--{name.replace('_', '-')}" for name in ("tokenizer_model", "vocab_file", "merge_file",
                                                            "vocab_size")
                  if name not in needed and getattr(self, name) is not None]
        if unused:
            raise TokenizerError(f"--tokenizer-type {kind} does not read {' or '.join(unused)}")
        if self.tokenizer_hf_include_special_tokens and kind != "HuggingFaceTokenizer":
            raise TokenizerError(f"--tokenizer-hf-include-special-tokens is for HuggingFaceTokenizer, not {kind}")
        for name in needed[:2] if kind != "NullTokenizer" else ():
            path = getattr(self, name)
            if not (os.path.isfile(path) or (kind == "HuggingFaceTokenizer" and os.path.isdir(path))):
                raise TokenizerError(f"--{name.replace('_', '-')}: no such file: {path}")
        if kind in SENTENCEPIECE_TYPES and _looks_like_json(self.tokenizer_model):
            raise TokenizerError(f"--tokenizer-model {self.tokenizer_model} is a JSON file (a HuggingFace "
                                 f"tokenizer?), not a SentencePiece model: pass --tokenizer-type HuggingFaceTokenizer")
        if kind == "HuggingFaceTokenizer":
            json_file = self.hf_files()["tokenizer.json"]
            if not os.path.isfile(json_file):
                raise TokenizerError(f"--tokenizer-model {self.tokenizer_model}: no tokenizer.json there (only "
                                     "HuggingFace fast tokenizers, with a tokenizer.json, are supported)")
            if not _looks_like_json(json_file):
                raise TokenizerError(f"--tokenizer-model {json_file} is not a tokenizer.json (a SentencePiece model? "
                                     "pass --tokenizer-type SentencePieceTokenizer)")
        if kind == "NullTokenizer" and self.vocab_size < 1:
            raise TokenizerError(f"--vocab-size {self.vocab_size}: needs at least 1")
        return dataclasses.replace(self, tokenizer_type=kind)

    def hf_files(self) -> Dict[str, str]:
        """HuggingFaceTokenizer: tokenizer.json and the configuration files beside it that exist."""
        model = self.tokenizer_model
        directory, json_file = (model, os.path.join(model, "tokenizer.json")) if os.path.isdir(model) else \
            (os.path.dirname(model), model)
        files = {"tokenizer.json": json_file}
        files.update({name: os.path.join(directory, name) for name in HF_CONFIG_FILES
                      if os.path.isfile(os.path.join(directory, name))})
        return files

    def files(self) -> Dict[str, str]:
        """The files that define the tokenizer, by role."""
        kind = self.type
        if kind == "HuggingFaceTokenizer":
            return self.hf_files()
        if kind == "GPT2BPETokenizer":
            return {"vocab.json": self.vocab_file, "merges.txt": self.merge_file}
        if kind == "NullTokenizer":
            return {}
        return {"model": self.tokenizer_model}

    def fingerprint(self) -> str:
        """sha256 of a SentencePiece model file; else of the type, its files' sha256 and its settings."""
        spec = self.resolved()
        if spec.type in SENTENCEPIECE_TYPES:
            return file_sha256(spec.tokenizer_model)
        described = {"type": spec.type, "files": {role: file_sha256(path) for role, path in spec.files().items()}}
        if spec.type == "NullTokenizer":
            described["vocab_size"] = spec.vocab_size
        if spec.tokenizer_hf_include_special_tokens:
            described["include_special_tokens"] = True
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()

    def describe(self) -> dict:
        """The sidecar fields naming the tokenizer (paths absolute)."""
        spec = self.resolved()
        out = {"tokenizer_type": spec.type}
        for name in TOKENIZER_FILES:
            if getattr(spec, name) is not None:
                out[name] = os.path.abspath(getattr(spec, name))
        if spec.vocab_size is not None:
            out["null_vocab_size"] = spec.vocab_size
        return out


def given_or_runs(args, run) -> TokenizerSpec:
    """A tool's tokenizer: the run's (`run`: its DataConfig or saved `data` dict) with the tokenizer flags given in
    `args` (parsed by add_tokenizer_arguments) replacing its own; all of the run's when --tokenizer-type is given."""
    given = TokenizerSpec.of(args)
    if given.tokenizer_type:
        return given
    saved = TokenizerSpec.of(run)
    return dataclasses.replace(saved, **{name: getattr(given, name) for name in FIELDS if getattr(given, name)})


def add_tokenizer_arguments(group, tokenizer_model_help: Optional[str] = None) -> None:
    """The tokenizer flags on an argparse parser (or group), defaults None: the tools' command lines."""
    for flag, dest, text, kwargs in TOKENIZER_FLAGS:
        if flag == "--tokenizer-model" and tokenizer_model_help:
            text = tokenizer_model_help
        group.add_argument(flag, dest=dest, help=text, **kwargs)
