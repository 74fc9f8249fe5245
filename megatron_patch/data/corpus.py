"""Reading a text corpus for preprocessing: input files, their split between processes, and tokenization.

One line is one document, as in Megatron-LM's tools/preprocess_data.py: JSON lines (`.jsonl`, or any other name)
whose keys hold a string (one sequence) or a list of strings (one sequence per string, as Megatron-LM's
--split-sentences writes), or plain text (`.txt`: the line is the document). Any of them may be compressed
(`.gz`, `.zst`).

Splitting: the inputs, in order, form one stream of bytes cut into equal ranges, one per process. An
uncompressed file may be cut anywhere; a range then owns the lines that START inside it, so every line is read by
exactly one process and the processes' outputs, concatenated in rank order, are the single-process output.
Compressed files cannot be entered in the middle and go whole to the process whose range holds their start.
"""

from __future__ import annotations

import bisect
import collections
import glob
import gzip
import io
import itertools
import json
import os
import signal
import stat
import sys
import zlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy
import zstandard

from megatron_patch.config.tokenizer import TokenizerSpec
from megatron_patch.data.tokenizers.wrappers import TOKENIZE_ERRORS, Tokenizer, build_tokenizer
from megatron_patch.errors import MegatronPatchError

READ_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError)
FORMAT_SUFFIXES = (".jsonl", ".json", ".txt")
COMPRESSION_SUFFIXES = (".gz", ".zst")
BATCH_LINES = 256
BATCH_BYTES = 4 << 20  # a batch also ends here, so very long documents do not pile up in memory


class BadInput(MegatronPatchError):
    """A problem with the input, reported as one line."""


def compression_of(path: str) -> Optional[str]:
    return next((suffix for suffix in COMPRESSION_SUFFIXES if path.endswith(suffix)), None)


def is_plain_text(path: str) -> bool:
    name = path[: -len(compression_of(path))] if compression_of(path) else path
    return name.endswith(".txt")


def expand_inputs(patterns: List[str]) -> List[str]:
    """Files named by paths, globs (sorted) and directories (their .jsonl/.json/.txt files, compressed or not,
    sorted), in the order given."""
    paths = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            suffixes = tuple(f + c for f in FORMAT_SUFFIXES for c in ("", *COMPRESSION_SUFFIXES))
            found = sorted(os.path.join(pattern, name) for name in os.listdir(pattern) if name.endswith(suffixes))
            if not found:
                raise BadInput(f"--input: no {'/'.join(FORMAT_SUFFIXES)} files (optionally .gz/.zst) in {pattern}")
        else:
            found = sorted(glob.glob(pattern))
            if not found:
                raise BadInput(f"--input: nothing matches {pattern}")
        paths.extend(found)
    repeated = [path for path, count in collections.Counter(paths).items() if count > 1]
    if repeated:
        raise BadInput(f"--input: {repeated[0]} is given more than once")
    return paths


@dataclass(frozen=True)
class Piece:
    """The lines of `path` that start in bytes [start, end) (end None: to the end of the file)."""

    path: str
    start: int = 0
    end: Optional[int] = None
    first_line: int = 1


def _splittable_size(path: str) -> Tuple[int, bool]:
    """(size, whether the file may be cut) -- compressed files, pipes and unreadable names are not cut."""
    try:
        info = os.stat(path)
    except OSError:
        return 0, False
    return info.st_size, stat.S_ISREG(info.st_mode) and compression_of(path) is None


def split_inputs(paths: List[str], num_ranks: int) -> List[List[Piece]]:
    """Each rank's pieces: consecutive, equal byte ranges of the inputs taken as one stream (see module doc)."""
    sizes = [_splittable_size(path) for path in paths]
    total = sum(size for size, _ in sizes)
    bounds = [total * rank // num_ranks for rank in range(num_ranks + 1)]

    def owner(offset):  # the last rank whose range starts at or before offset
        return min(bisect.bisect_right(bounds, offset), num_ranks) - 1

    pieces: List[List[Piece]] = [[] for _ in range(num_ranks)]
    offset = 0
    for path, (size, splittable) in zip(paths, sizes):
        cuts = [bound - offset for bound in bounds[1:-1] if offset < bound < offset + size] if splittable else []
        for start, end in zip([0, *cuts], [*cuts, None]):
            pieces[owner(offset + start)].append(Piece(path, start, end))
        offset += size
    return pieces


def count_lines(piece: Piece) -> int:
    """How many lines start in the piece (it must have an end): the newlines in [start-1, end-1), plus the first
    line when the piece starts the file. A file that cannot be read counts 0: reading it will report it."""
    count = int(piece.start == 0)
    try:
        with open(piece.path, "rb") as f:
            f.seek(max(piece.start - 1, 0))
            remaining = piece.end - 1 - max(piece.start - 1, 0)
            while remaining > 0:
                block = f.read(min(remaining, 16 << 20))
                if not block:
                    break
                count += block.count(b"\n")
                remaining -= len(block)
    except OSError:
        return 0
    return count


def number_lines(pieces: List[Piece], line_counts: Dict[Tuple[str, int], int]) -> List[Piece]:
    """The pieces with `first_line` set from the line counts of the pieces before them in the same file."""
    numbered = []
    for piece in pieces:
        before = sum(count for (path, start), count in line_counts.items()
                     if path == piece.path and start < piece.start)
        numbered.append(Piece(piece.path, piece.start, piece.end, 1 + before))
    return numbered


class _ZstdReader(io.RawIOBase):
    """Decompressed bytes of a .zst file (any number of frames). Unlike zstandard's stream_reader, a file that
    ends inside a frame raises EOFError instead of looking like a shorter file."""

    def __init__(self, path: str):
        self._file = open(path, "rb")
        self._decompressor = zstandard.ZstdDecompressor(max_window_size=1 << 31)
        self._frame = None
        self._pending = memoryview(b"")

    def readable(self):
        return True

    def readinto(self, buffer):
        while not self._pending:
            chunk = self._file.read(1 << 20)
            if not chunk:
                if self._frame is not None and not self._frame.eof:
                    raise EOFError("the zstd data ends inside a frame (truncated file?)")
                return 0
            out = []
            while chunk:
                if self._frame is None or self._frame.eof:
                    self._frame = self._decompressor.decompressobj()
                out.append(self._frame.decompress(chunk))
                chunk = self._frame.unused_data if self._frame.eof else b""
            self._pending = memoryview(b"".join(out))
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self):
        self._file.close()
        super().close()


def _open(path: str):
    compression = compression_of(path)
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".zst":
        return io.BufferedReader(_ZstdReader(path), 1 << 20)
    return open(path, "rb", buffering=1 << 20)


def read_lines(piece: Piece) -> Iterator[bytes]:
    with _open(piece.path) as f:
        if piece.start:
            f.seek(piece.start - 1)
            f.readline()  # the rest of the line that starts before the piece
        position = f.tell() if piece.end is not None else 0
        for line in f:
            if piece.end is not None:
                if position >= piece.end:
                    return
                position += len(line)
            yield line


@dataclass
class Batch:
    """Consecutive lines of one file, from `first_line` on. `error`: the file could not be read past them."""

    path: str
    first_line: int
    lines: List[bytes]
    error: Optional[str] = None

    @property
    def num_bytes(self) -> int:
        return sum(map(len, self.lines))


def read_batches(pieces: List[Piece]) -> Iterator[Batch]:
    for piece in pieces:
        lines: List[bytes] = []
        first_line, num_bytes = piece.first_line, 0
        try:
            for line in read_lines(piece):
                lines.append(line)
                num_bytes += len(line)
                if len(lines) == BATCH_LINES or num_bytes >= BATCH_BYTES:
                    yield Batch(piece.path, first_line, lines)
                    first_line += len(lines)
                    lines, num_bytes = [], 0
        except READ_ERRORS as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
            yield Batch(piece.path, first_line, lines, error=f"cannot read from line {first_line + len(lines)} "
                                                             f"on: {type(e).__name__}: {reason}")
            continue
        if lines:
            yield Batch(piece.path, first_line, lines)


class BadLine(Exception):
    pass


@dataclass
class Encoded:
    """One batch tokenized: for each key, the arrays DatasetWriter.add_documents takes; the lines that were
    skipped or had no tokens, as (line number, reason)."""

    path: str
    arrays: Dict[str, Tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]]
    skipped: List[Tuple[int, str]]
    empty: Dict[str, List[int]]
    num_documents: int
    num_bytes: int
    error: Optional[str] = None


def parse_line(raw: bytes, plain_text: bool, json_keys: List[str]) -> Optional[Dict[str, List[str]]]:
    """{key: list of sequences} of one input line; None for a blank JSON line (not a document). Raises BadLine."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadLine(f"not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    if plain_text:
        return {json_keys[0]: [text.removesuffix("\n").removesuffix("\r")]}
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadLine(f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise BadLine(f"not a JSON object but {type(obj).__name__}")
    doc = {}
    for key in json_keys:
        if key not in obj:
            raise BadLine(f"no key '{key}'")
        value = obj[key]
        if isinstance(value, str):
            doc[key] = [value]
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            doc[key] = value
        else:
            raise BadLine(f"'{key}' is {type(value).__name__}, expected a string or a list of strings")
    return doc


def read_documents(paths: List[str], json_key: str) -> Iterator[Tuple[str, int, str]]:
    """(path, line, text) of every document of the inputs (a JSON key's sequences joined); a line that cannot be
    used raises BadInput naming FILE:LINE."""
    for path in paths:
        for number, raw in enumerate(read_lines(Piece(path)), 1):
            try:
                doc = parse_line(raw, is_plain_text(path), [json_key])
            except BadLine as e:
                raise BadInput(f"{path}:{number}: {e}") from None
            if doc is not None:
                yield path, number, "".join(doc[json_key])


class Encoder:
    """Tokenizes batches (in worker processes or in this one): every document, EOD appended, padded to a multiple
    of the patch size. Matches Megatron-LM's Encoder.encode: sequences without tokens are dropped, a document
    without tokens gets no EOD and no sequences (it still counts as a document in the index)."""

    tokenizer: Optional[Tokenizer] = None  # one per process, loaded by load()

    def __init__(self, tokenizer: TokenizerSpec, json_keys: List[str], append_eod: bool, patch_size: int, pad_id: int,
                 dtype):
        self.tokenizer_spec = tokenizer
        self.pad_id = pad_id
        self.json_keys = json_keys
        self.append_eod = append_eod
        self.patch_size = patch_size
        self.dtype = numpy.dtype(dtype)

    def load(self) -> None:
        Encoder.tokenizer = build_tokenizer(self.tokenizer_spec)

    def start_worker(self) -> None:
        """Pool initializer: Ctrl-C is the main process's to handle, and a worker must not outlive it (kill -9).
        One thread per worker for the `tokenizers` library's batches (the workers already fill the cores)."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.environ.setdefault("RAYON_NUM_THREADS", "1")
        if sys.platform.startswith("linux"):
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: killed when the parent dies
        self.load()

    def encode(self, batch: Batch) -> Encoded:
        docs, lines, skipped = [], [], []
        for line_number, raw in enumerate(batch.lines, batch.first_line):
            try:
                doc = parse_line(raw, is_plain_text(batch.path), self.json_keys)
            except BadLine as e:
                skipped.append((line_number, str(e)))
                continue
            if doc is not None:
                docs.append(doc)
                lines.append(line_number)
        ids = {key: self._tokenize([doc[key] for doc in docs]) for key in self.json_keys}
        failed = sorted({i for key in self.json_keys for i, doc_ids in enumerate(ids[key]) if isinstance(doc_ids, str)})
        skipped += [(lines[i], next(ids[key][i] for key in self.json_keys if isinstance(ids[key][i], str)))
                    for i in failed]
        keep = sorted(set(range(len(docs))) - set(failed))
        arrays, empty = {}, {}
        for key in self.json_keys:
            arrays[key] = self._arrays([ids[key][i] for i in keep])
            empty[key] = [lines[i] for i, n in zip(keep, arrays[key][2]) if n == 0]
        return Encoded(batch.path, arrays, sorted(skipped), empty, len(keep), batch.num_bytes, batch.error)

    def _tokenize(self, docs: List[List[str]]) -> list:
        """Per document, its sequences' ids; a string instead for a document the tokenizer rejects."""
        try:
            flat = Encoder.tokenizer.tokenize_batch([text for sequences in docs for text in sequences])
        except TOKENIZE_ERRORS:
            # One bad text fails the whole call (e.g. a lone surrogate from a "\ud800" JSON escape): find it.
            return [self._tokenize_one(sequences) for sequences in docs]
        it = iter(flat)
        return [list(itertools.islice(it, len(sequences))) for sequences in docs]

    def _tokenize_one(self, sequences: List[str]):
        try:
            return Encoder.tokenizer.tokenize_batch(sequences)
        except TOKENIZE_ERRORS as e:
            return f"the tokenizer rejects the text ({type(e).__name__}: {e})"

    def _arrays(self, docs: List[List[List[int]]]):
        """(tokens, sequence lengths, sequences per document) of tokenized documents."""
        tok, k = Encoder.tokenizer, self.patch_size
        parts, lengths, per_document = [], [], []
        for sequences in docs:
            kept = [ids for ids in sequences if ids]
            if not kept:
                per_document.append(0)
                continue
            seq_lengths = [len(ids) for ids in kept]
            tail = [tok.eod] if self.append_eod else []
            if k > 1:
                # One sequence per document: PatchGPTDataset needs every sequence to be whole patches.
                seq_lengths = [sum(seq_lengths)]
                tail += [self.pad_id] * (-(seq_lengths[0] + len(tail)) % k)
            seq_lengths[-1] += len(tail)
            parts += kept
            parts.append(tail)
            lengths += seq_lengths
            per_document.append(len(seq_lengths))
        tokens = numpy.fromiter(itertools.chain.from_iterable(parts), self.dtype, count=sum(lengths))
        return tokens, numpy.asarray(lengths, numpy.int32), numpy.asarray(per_document, numpy.int32)
