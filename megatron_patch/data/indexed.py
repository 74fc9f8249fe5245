"""Writing Megatron `.bin/.idx` datasets safely, and the JSON sidecar describing them.

Files are written under temporary names and renamed into place only when complete, so an interrupted run
never leaves a dataset that looks finished and never clobbers an existing one half-way."""

from __future__ import annotations

import json
import os
from typing import Iterable, Optional

import numpy
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder


def token_dtype(vocab_size: int):
    """Megatron-LM's choice: uint16 when every id fits, else int32."""
    return numpy.uint16 if vocab_size < 65500 else numpy.int32


def sidecar_path(prefix: str) -> str:
    return prefix + ".meta.json"


def read_sidecar(prefix: str) -> Optional[dict]:
    path = sidecar_path(prefix)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def pad_to_patch(ids: list, patch_size: int, pad_id: int) -> list:
    """Pad a document (EOD included) to a multiple of the patch size so no patch spans two documents."""
    remainder = len(ids) % patch_size
    return ids + [pad_id] * (patch_size - remainder) if remainder else ids


def _atomic_replace(tmp: str, final: str) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


class DatasetWriter:
    """Documents in, `{prefix}.bin/.idx/.meta.json` out; nothing appears under the final names until
    `finalize()` succeeds. Use as a context manager: an exception removes the partial files."""

    def __init__(self, prefix: str, vocab_size: int, metadata: dict):
        self.prefix = prefix
        self.metadata = dict(metadata, vocab_size=vocab_size, dtype=numpy.dtype(token_dtype(vocab_size)).name)
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._tmp = f"{prefix}.tmp{os.getpid()}"
        self._builder = IndexedDatasetBuilder(self._tmp + ".bin", dtype=token_dtype(vocab_size))
        self.num_documents = 0
        self.num_tokens = 0

    def add_document(self, ids: Iterable[int]) -> None:
        ids = numpy.asarray(ids, dtype=numpy.int64)
        self._builder.add_document(ids, [ids.size])
        self.num_documents += 1
        self.num_tokens += ids.size

    def finalize(self, extra_metadata: Optional[dict] = None) -> None:
        self._builder.finalize(self._tmp + ".idx")
        meta = dict(self.metadata, num_documents=self.num_documents, num_tokens=self.num_tokens)
        meta.update(extra_metadata or {})
        with open(self._tmp + ".meta.json", "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        # The sidecar goes last: a reader that finds it knows .bin/.idx are complete.
        for suffix in (".bin", ".idx", ".meta.json"):
            _atomic_replace(self._tmp + suffix, self.prefix + suffix)

    def abort(self) -> None:
        self._builder.data_file.close()
        for suffix in (".bin", ".idx", ".meta.json"):
            if os.path.exists(self._tmp + suffix):
                os.remove(self._tmp + suffix)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False
