"""Megatron `.bin/.idx` datasets: a streaming writer that commits atomically, and the JSON sidecar.

The format is megatron-core's (`megatron.core.datasets.indexed_dataset`): `.bin` holds the token ids back to
back; `.idx` holds a header, the length of every sequence (int32), its byte offset in `.bin` (int64) and the
sequence index ending every document (int64, starting with 0). The tests check the bytes against megatron-core's
IndexedDatasetBuilder. It is written here with numpy alone, for two reasons: the index streams through files on
disk, so memory stays bounded however large the corpus (megatron-core's builder keeps Python lists of every
length), and importing megatron-core (4 s: it imports torch) is not needed to tokenize text.

A dataset is complete when its sidecar `{prefix}.meta.json` exists: it is written last, after `.bin` and `.idx`
are in place, and removed first when a dataset is replaced.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import threading
from typing import Optional

import numpy

from megatron_patch.errors import MegatronPatchError

_HEADER = b"MMIDIDX\x00\x00"
_VERSION = 1
# megatron-core's DType codes, as written in the .idx header.
_DTYPE_CODES = {1: numpy.uint8, 2: numpy.int8, 3: numpy.int16, 4: numpy.int32, 5: numpy.int64, 6: numpy.float64,
                7: numpy.float32, 8: numpy.uint16}
_CODE_OF_DTYPE = {numpy.dtype(dtype): code for code, dtype in _DTYPE_CODES.items()}
_CHUNK = 1 << 20  # index entries handled at a time when streaming
SUFFIXES = (".bin", ".idx", ".meta.json")
TOKEN_COUNTS = "token_counts"  # the sidecar's occurrences of each token id (index = id)


class DatasetFormatError(MegatronPatchError, ValueError):
    pass


def token_dtype(vocab_size: int) -> numpy.dtype:
    """Megatron-LM's choice (DType.optimal_dtype): uint16 when every id fits, else int32."""
    return numpy.dtype(numpy.uint16 if vocab_size < 65500 else numpy.int32)


def sidecar_path(prefix: str) -> str:
    return prefix + ".meta.json"


def read_sidecar(prefix: str) -> Optional[dict]:
    path = sidecar_path(prefix)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


class IndexHeader:
    """What a `.idx` file says about its dataset, with the byte offsets of its three arrays."""

    def __init__(self, idx_path: str):
        with open(idx_path, "rb") as f:
            head = f.read(len(_HEADER) + 8 + 1 + 8 + 8)
        if len(head) < 34 or head[:9] != _HEADER:
            raise DatasetFormatError(f"{idx_path}: not a Megatron .idx file")
        version, code, self.num_sequences, num_document_indices = struct.unpack("<QBQQ", head[9:])
        if version != _VERSION or code not in _DTYPE_CODES:
            raise DatasetFormatError(f"{idx_path}: unsupported .idx version {version} or dtype code {code}")
        self.path = idx_path
        self.dtype = numpy.dtype(_DTYPE_CODES[code])
        self.num_documents = num_document_indices - 1
        self.lengths_offset = len(head)
        self.document_indices_offset = self.lengths_offset + 12 * self.num_sequences
        expected_size = self.document_indices_offset + 8 * num_document_indices
        if os.path.getsize(idx_path) < expected_size:
            raise DatasetFormatError(f"{idx_path}: truncated ({os.path.getsize(idx_path)} bytes, expected "
                                     f"{expected_size})")

    def sequence_lengths(self) -> numpy.ndarray:
        return _mapped(self.path, numpy.int32, self.lengths_offset, self.num_sequences)

    def document_indices(self) -> numpy.ndarray:
        return _mapped(self.path, numpy.int64, self.document_indices_offset, self.num_documents + 1)


def check_dataset(prefix: str) -> tuple:
    """(index header, tokens) of the dataset `prefix` after checking that its files agree: the .idx parses, the .bin
    holds exactly the tokens the index describes, and the sidecar (if any) says the same dtype, counts and patch
    size. DatasetFormatError naming the file and what is wrong: a damaged dataset is refused before it is read,
    not met as garbage samples or a crash deep in a data loader worker."""
    header = IndexHeader(prefix + ".idx")
    ends = header.document_indices()
    if ends.size == 0 or ends[0] != 0 or ends[-1] != header.num_sequences:
        raise DatasetFormatError(f"{prefix}.idx: damaged (its document index does not end at its "
                                 f"{header.num_sequences} sequences)")
    sidecar = read_sidecar(prefix) or {}
    patch_size = sidecar.get("patch_size", 1)
    num_tokens, misaligned = 0, 0
    for lengths in _chunks(header.sequence_lengths()):
        if lengths.size and lengths.min() < 0:
            raise DatasetFormatError(f"{prefix}.idx: damaged (negative sequence lengths)")
        num_tokens += int(lengths.sum(dtype=numpy.int64))
        misaligned += int(numpy.count_nonzero(lengths % patch_size))
    bin_size = os.path.getsize(prefix + ".bin")
    if bin_size != num_tokens * header.dtype.itemsize:
        raise DatasetFormatError(f"{prefix}.bin: {bin_size} bytes, its index describes "
                                 f"{num_tokens * header.dtype.itemsize} ({num_tokens} {header.dtype.name} tokens): "
                                 f"truncated or from another dataset")
    actual = {"dtype": header.dtype.name, "num_sequences": header.num_sequences,
              "num_documents": header.num_documents, "num_tokens": num_tokens}
    wrong = [f"{key} {sidecar[key]} (the files: {value})" for key, value in actual.items()
             if key in sidecar and sidecar[key] != value]
    if misaligned:
        wrong.append(f"patch_size {patch_size} ({misaligned} sequences of the files are not a multiple of it)")
    if wrong:
        raise DatasetFormatError(f"{sidecar_path(prefix)}: disagrees with {prefix}.bin/.idx: it says "
                                 + ", ".join(wrong) + " (a stale sidecar, or files from another dataset)")
    return header, num_tokens


def _mapped(path: str, dtype, offset: int, count: int) -> numpy.ndarray:
    """`count` values at `offset` of a file, mapped rather than read (numpy cannot map zero bytes)."""
    return numpy.memmap(path, dtype, "r", offset, (count,)) if count else numpy.empty(0, dtype)


def add_token_counts(counts: numpy.ndarray, tokens: numpy.ndarray) -> numpy.ndarray:
    """`counts` (occurrences per token id) plus those of `tokens`, grown to the largest id seen."""
    added = numpy.bincount(tokens, minlength=len(counts))
    added[:len(counts)] += counts
    return added


def _chunks(array: numpy.ndarray):
    for start in range(0, len(array), _CHUNK):
        yield numpy.asarray(array[start:start + _CHUNK])


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM wait until the block is done: a dataset half replaced is worse than a later exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    previous = {sig: signal.signal(sig, lambda signum, frame: held.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        for sig in held:
            signal.raise_signal(sig)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DatasetWriter:
    """Documents in, a dataset out. Everything is written under `{work_prefix}.*`; `commit(prefix, ...)` then
    moves it to `{prefix}.bin/.idx/.meta.json`, so nothing appears under final names before it is complete.
    `remove()` deletes the work files (on failure)."""

    def __init__(self, work_prefix: str, dtype):
        self.work_prefix = work_prefix
        self.dtype = numpy.dtype(dtype)
        os.makedirs(os.path.dirname(os.path.abspath(work_prefix)), exist_ok=True)
        # The index streams to two scratch files; close() assembles the .idx from them.
        self._bin = _NamedFile(work_prefix + ".bin")
        self._lengths = _NamedFile(work_prefix + ".lengths.tmp")
        self._document_ends = _NamedFile(work_prefix + ".docs.tmp")
        self.num_documents = 0
        self.num_sequences = 0
        self.num_tokens = 0
        self.token_counts = numpy.zeros(0, numpy.int64)  # occurrences of each id: the sidecar's, for unigram.py
        self.closed = False

    def _count(self, tokens: numpy.ndarray) -> None:
        self.token_counts = add_token_counts(self.token_counts, tokens)

    def add_documents(self, tokens: numpy.ndarray, sequence_lengths: numpy.ndarray,
                      sequences_per_document: numpy.ndarray) -> None:
        """Append documents: their tokens back to back, the length of each sequence, and how many sequences each
        document has (0 for a document without tokens, as Megatron-LM records one)."""
        tokens = numpy.ascontiguousarray(tokens, dtype=self.dtype)
        self._bin.write(tokens.tobytes())
        self._count(tokens)
        self._lengths.write(numpy.asarray(sequence_lengths, dtype=numpy.int32).tobytes())
        ends = self.num_sequences + numpy.cumsum(sequences_per_document, dtype=numpy.int64)
        self._document_ends.write(ends.tobytes())
        self.num_documents += len(sequences_per_document)
        self.num_sequences += len(sequence_lengths)
        self.num_tokens += len(tokens)

    def add_dataset(self, prefix: str) -> None:
        """Append a whole dataset, as megatron-core's IndexedDatasetBuilder.add_index does, streaming."""
        header, num_tokens = check_dataset(prefix)
        if header.dtype != self.dtype:
            raise DatasetFormatError(f"{prefix}: token dtype {header.dtype}, expected {self.dtype}")
        for lengths in _chunks(header.sequence_lengths()):
            self._lengths.write(lengths.tobytes())
        for ends in _chunks(header.document_indices()[1:]):
            self._document_ends.write((ends + self.num_sequences).tobytes())
        with open(prefix + ".bin", "rb") as f:
            shutil.copyfileobj(f, self._bin, 16 << 20)
        for tokens in _chunks(_mapped(prefix + ".bin", self.dtype, 0, num_tokens)):
            self._count(tokens)
        self.num_documents += header.num_documents
        self.num_sequences += header.num_sequences
        self.num_tokens += num_tokens

    def close(self) -> None:
        """Write `{work_prefix}.idx` (megatron-core's _IndexWriter layout) and drop the scratch files."""
        if self.closed:
            return
        for f in (self._bin, self._lengths, self._document_ends):
            f.close()
        lengths_path, ends_path = self.work_prefix + ".lengths.tmp", self.work_prefix + ".docs.tmp"
        with _NamedFile(self.work_prefix + ".idx") as idx:
            idx.write(_HEADER)
            idx.write(struct.pack("<QB", _VERSION, _CODE_OF_DTYPE[self.dtype]))
            idx.write(struct.pack("<QQ", self.num_sequences, self.num_documents + 1))
            with open(lengths_path, "rb") as f:
                shutil.copyfileobj(f, idx, 16 << 20)
            # Byte offset of each sequence in .bin: an exclusive running sum of the lengths.
            offset = 0
            for lengths in _chunks(_mapped(lengths_path, numpy.int32, 0, self.num_sequences)):
                ends = offset + numpy.cumsum(lengths, dtype=numpy.int64) * self.dtype.itemsize
                idx.write(numpy.concatenate(([offset], ends[:-1])).astype(numpy.int64).tobytes())
                offset = int(ends[-1])
            idx.write(numpy.zeros(1, numpy.int64).tobytes())
            with open(ends_path, "rb") as f:
                shutil.copyfileobj(f, idx, 16 << 20)
        os.remove(lengths_path)
        os.remove(ends_path)
        self.closed = True

    def commit(self, prefix: str, metadata: dict) -> None:
        """Move the dataset to `prefix` with a sidecar of `metadata` plus its dtype and counts. An existing dataset
        there loses its sidecar first, so an interruption between the renames never leaves a complete-looking
        mixture of old and new files."""
        self.close()
        meta = dict(metadata, dtype=self.dtype.name, num_documents=self.num_documents,
                    num_sequences=self.num_sequences, num_tokens=self.num_tokens)
        meta.pop(TOKEN_COUNTS, None)
        # The counts last and on one line, so the rest stays readable.
        text = json.dumps(meta, indent=2, sort_keys=True)[:-2] + f',\n  "{TOKEN_COUNTS}": ' + json.dumps(
            self.token_counts.tolist(), separators=(",", ":")) + "\n}\n"
        with _NamedFile(self.work_prefix + ".meta.json") as f:
            f.write(text.encode())
        for suffix in SUFFIXES:
            _fsync(self.work_prefix + suffix)
        with _signals_held():
            if os.path.exists(sidecar_path(prefix)):
                os.remove(sidecar_path(prefix))
            for suffix in SUFFIXES:  # the sidecar last: it marks the dataset complete
                os.replace(self.work_prefix + suffix, prefix + suffix)
        _fsync(os.path.dirname(os.path.abspath(prefix)))

    def remove(self) -> None:
        for f in (self._bin, self._lengths, self._document_ends):
            f.discard()  # a full disk fails their last flush too: the files go anyway
        remove_dataset_files(self.work_prefix)


class _NamedFile:
    """A file written in binary whose OSErrors name it: a buffered write or close that fails (a full disk, a file
    size limit) raises an OSError without the file name, which the one-line error must give."""

    def __init__(self, path: str):
        self.name = path
        self._file = open(path, "wb")

    def _named(self, error: OSError) -> OSError:
        return error if error.filename else OSError(error.errno, error.strerror, self.name)

    def write(self, data) -> int:
        try:
            return self._file.write(data)
        except OSError as e:
            raise self._named(e) from None

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as e:
            raise self._named(e) from None

    def discard(self) -> None:
        """Close, whatever the unwritten data's fate (the file is about to be removed)."""
        with contextlib.suppress(OSError):
            self._file.close()

    def __enter__(self) -> "_NamedFile":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.discard()


def remove_dataset_files(prefix: str) -> None:
    for suffix in (*SUFFIXES, ".lengths.tmp", ".docs.tmp"):
        if os.path.exists(prefix + suffix):
            os.remove(prefix + suffix)
