"""SentencePiece tokenizer in the shape megatron-core's datasets expect (vocab_size, eod, pad,
unique_identifiers), with batched encoding for preprocessing. (Not derived from megatron-core's deprecated
MegatronLegacyTokenizer, which only adds a warning per process.)"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import List, Sequence

import sentencepiece as spm


def model_sha256(model_path: str) -> str:
    """Fingerprint of a tokenizer model file (dataset sidecars and checkpoints record it; paths may move)."""
    digest = hashlib.sha256()
    with open(model_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class SentencePieceTokenizer:
    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model not found: {model_path}")
        self.model_path = model_path
        # Part of megatron-core's dataset cache key: samples built for one tokenizer are never reused for another.
        self.unique_identifiers = OrderedDict(class_=type(self).__name__, tokenizer_path=[os.path.abspath(model_path)])
        self._sp = spm.SentencePieceProcessor(model_file=model_path)

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
