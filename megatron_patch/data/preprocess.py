"""Tokenizing a corpus into Megatron `.bin/.idx` datasets: the work behind tools/preprocess_data.py.

One process, or the ranks of an MPI job (mpirun/srun with more than one rank, or --mpi), run the same Job. Rank 0
plans it (expands the inputs, checks the tokenizer and pad id, and cuts the input bytes into one consecutive share
per rank: files are cut at line starts, compressed files go whole to one rank) and broadcasts the plan; every rank
tokenizes its share with an EncodingPool of worker processes into partial datasets under temporary names, and rank
0 concatenates them in rank order, so the result is identical to a single process's. The output directory must be
shared by the ranks.

Failures are agreed on, never left to a timeout: a setup error on rank 0 is reported once, there, and the other
ranks stop quietly (from_root, ReportedOnRoot); a rank that fails while encoding sends every other rank a stop
message, which they poll for between batches (Stopped), and every rank then reaches the same collectives, learns
who failed, receives the stop messages addressed to it (none is left in flight), removes its temporary files and
exits non-zero. No output is written unless every rank succeeded; a rank that dies outright is mpirun's or srun's
to kill. The worker pools are started with forkserver: forking a process that has initialised MPI is unsafe on
some interconnects.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from megatron_patch.config.tokenizer import TokenizerError, TokenizerSpec
from megatron_patch.data.corpus import (
    BadInput,
    Encoder,
    Piece,
    count_lines,
    expand_inputs,
    is_plain_text,
    number_lines,
    read_batches,
    split_inputs,
)
from megatron_patch.data.indexed import DatasetWriter, token_dtype
from megatron_patch.data.tokenizers.wrappers import build_tokenizer

MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")
MAX_REPORTED = 100  # skipped lines listed per process; the rest are counted


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so the same clean-up runs."""


class Stopped(Exception):
    """Another rank failed: this one stops too."""


class ReportedOnRoot(Exception):
    """A setup error rank 0 has reported for everyone."""


def raise_terminated(signum, frame):
    """The SIGTERM handler: raises Terminated."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: let the clean-up finish
    raise Terminated("SIGTERM")


# ---------------------------------------------------------------------------------------------- process groups

class SingleProcess:
    rank, size = 0, 1

    def bcast(self, value):
        return value

    def allgather(self, value):
        return [value]

    def tell_others_to_stop(self):
        pass

    def stopped_by_other(self) -> bool:
        return False

    def settle(self, failed_ranks):
        pass


class MPIGroup:
    """The ranks of an MPI job. A failing rank sends every other rank a stop message, which they poll for between
    batches; at the end every rank receives the stop messages addressed to it, so none is left in flight."""

    STOP_TAG = 7301

    def __init__(self):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self._stop_requests = []

    def bcast(self, value):
        return self.comm.bcast(value, root=0)

    def allgather(self, value):
        return self.comm.allgather(value)

    def tell_others_to_stop(self):
        self._stop_requests = [self.comm.isend(self.rank, dest=r, tag=self.STOP_TAG)
                               for r in range(self.size) if r != self.rank]

    def stopped_by_other(self) -> bool:
        return self.comm.Iprobe(source=self.MPI.ANY_SOURCE, tag=self.STOP_TAG)

    def settle(self, failed_ranks):
        for rank in failed_ranks:
            if rank != self.rank:
                self.comm.recv(source=rank, tag=self.STOP_TAG)
        self.MPI.Request.waitall(self._stop_requests)


def process_group(force_mpi: bool):
    srun_tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))
    if not force_mpi and srun_tasks == 1 and not any(name in os.environ for name in MPI_ENV):
        return SingleProcess()
    try:
        group = MPIGroup()
    except ImportError as e:
        raise BadInput(f"--mpi: mpi4py is not usable ({e})") from None
    if group.size == 1 and srun_tasks > 1:  # N copies would each do all the work
        raise BadInput(f"srun started {srun_tasks} tasks but MPI connects none of them: launch with "
                       "srun --mpi=pmix (or pmi2), or run one task")
    return group if group.size > 1 else SingleProcess()


def from_root(group, make):
    """make() on rank 0, its result on every rank. If it fails there, rank 0 raises the error and reports it for
    everyone: the other ranks raise ReportedOnRoot (and never wait for a rank 0 that has given up)."""
    result, failed = None, False
    if group.rank == 0:
        try:
            result = make()
        except BaseException:
            group.bcast((None, True))
            raise
    result, failed = group.bcast((result, failed))
    if failed:
        raise ReportedOnRoot()
    return result


# ---------------------------------------------------------------------------------------------- progress

@dataclass
class Stats:
    documents: int = 0
    num_bytes: int = 0
    skipped_lines: int = 0
    unreadable_files: int = 0
    tokens: Dict[str, int] = field(default_factory=dict)
    empty_documents: Dict[str, int] = field(default_factory=dict)

    def add(self, other: "Stats") -> "Stats":
        keys = set(self.tokens) | set(other.tokens)
        return Stats(self.documents + other.documents, self.num_bytes + other.num_bytes,
                     self.skipped_lines + other.skipped_lines, self.unreadable_files + other.unreadable_files,
                     {k: self.tokens.get(k, 0) + other.tokens.get(k, 0) for k in keys},
                     {k: self.empty_documents.get(k, 0) + other.empty_documents.get(k, 0) for k in keys})

    def throughput(self, elapsed: float) -> str:
        return f"{self.num_bytes / max(elapsed, 1e-9) / 2**20:.2f} MB/s, {sum(self.tokens.values())} tokens"

    def rates(self, elapsed: float) -> str:
        return f"{self.documents / max(elapsed, 1e-9):.1f} docs/s, {self.throughput(elapsed)}"


class Progress:
    """A tqdm bar when stderr is a terminal (one process), else a log line every `log_interval` documents."""

    def __init__(self, stats: Stats, log_interval: int, label: str, bar: bool):
        self.stats, self.log_interval, self.label = stats, log_interval, label
        self.start = time.time()
        self.next_log = log_interval
        self.bar = None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(unit=" docs", dynamic_ncols=True, file=sys.stderr)

    def update(self, documents: int) -> None:
        if self.bar is not None:
            self.bar.update(documents)
            self.bar.set_postfix_str(self.stats.throughput(time.time() - self.start), refresh=False)
        elif self.log_interval and self.stats.documents >= self.next_log:
            self.next_log += self.log_interval * (1 + (self.stats.documents - self.next_log) // self.log_interval)
            print(f"{self.label}processed {self.stats.documents} documents "
                  f"({self.stats.rates(time.time() - self.start)})", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------- encoding

class EncodingPool:
    """Encoded batches in input order. With workers > 1 a process pool tokenizes, at most two batches per worker
    in flight, so memory stays bounded however large the input. forkserver: forking a process that has
    initialised MPI is unsafe on some interconnects (the workers unpickle the Encoder by importing
    megatron_patch.data.corpus, which the installed package provides)."""

    def __init__(self, encoder: Encoder, workers: int):
        self.encoder, self.workers, self.pool = encoder, workers, None

    def __enter__(self):
        if self.workers > 1:
            context = multiprocessing.get_context("forkserver")
            self.pool = context.Pool(self.workers, initializer=self.encoder.start_worker)
        else:
            self.encoder.load()
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.pool is not None:
            if exc_type is None:
                self.pool.close()
                self.pool.join()
            else:
                self.pool.terminate()
        return False

    def encode(self, batches):
        if self.pool is None:
            yield from map(self.encoder.encode, batches)
            return
        pending = deque()
        for batch in batches:
            pending.append(self.pool.apply_async(self.encoder.encode, (batch,)))
            while pending and (len(pending) > 2 * self.workers or pending[0].ready()):
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def output_prefix(args, key: str) -> str:
    return f"{args.output_prefix}_{key}_document"


class Job:
    """One run of tools/preprocess_data.py on one rank; `args` are its parsed arguments."""

    def __init__(self, args, group):
        self.args, self.group = args, group
        self.label = f"rank {group.rank}/{group.size}: " if group.size > 1 else ""
        self.reported = 0

    def report(self, message: str) -> None:
        """One skipped line or file: an error with --strict, else a line on stderr."""
        if self.args.strict:
            raise BadInput(message)
        self.note(message)

    def note(self, message: str) -> None:
        """A line on stderr, for the first MAX_REPORTED problems of this process."""
        self.reported += 1
        if self.reported <= MAX_REPORTED:
            print(message, file=sys.stderr)
        elif self.reported == MAX_REPORTED + 1:
            print(f"{self.label}more than {MAX_REPORTED} problems: the rest are counted, not listed",
                  file=sys.stderr)

    def tokenizer_spec(self) -> TokenizerSpec:
        """The tokenizer the arguments name, its type resolved (BadInput, one line, for flags that do not fit)."""
        try:
            return TokenizerSpec.of(self.args).resolved()
        except TokenizerError as e:
            raise BadInput(str(e)) from None

    def plan(self):
        """Rank 0: the inputs, each rank's share of them, and the sidecar fields every output shares."""
        args = self.args
        paths = expand_inputs(args.input)
        if len(args.json_keys) > 1 and any(is_plain_text(p) for p in paths):
            raise BadInput("--json-keys: plain-text inputs hold one document per line, give a single key "
                           "(it names the output)")
        spec = self.tokenizer_spec()
        try:
            tokenizer = build_tokenizer(spec)
        except TokenizerError as e:
            raise BadInput(str(e)) from None
        pad_id = tokenizer.pad if args.pad_id is None else args.pad_id
        if args.patch_size > 1 and pad_id < 0:
            name = spec.tokenizer_model or spec.vocab_file or spec.type
            raise BadInput(f"--patch-size {args.patch_size}: tokenizer {name} has no pad id to align documents "
                           "with; give one with --pad-id (e.g. its unk id)")
        if args.pad_id is not None and not (0 <= pad_id < tokenizer.vocab_size and pad_id != tokenizer.eod):
            raise BadInput(f"--pad-id {pad_id}: needs an id of the tokenizer's {tokenizer.vocab_size} other than "
                           f"its EOD id {tokenizer.eod}")
        shared = dict(**spec.describe(), tokenizer_sha256=tokenizer.fingerprint,
                      vocab_size=tokenizer.vocab_size, eod_id=tokenizer.eod, pad_id=pad_id,
                      patch_size=args.patch_size, append_eod=args.append_eod,
                      inputs=[os.path.abspath(p) for p in paths])
        run_id = f"{socket.gethostname()}-{os.getpid()}"
        return shared, split_inputs(paths, self.group.size), run_id

    def number_my_pieces(self, pieces: List[Piece]) -> List[Piece]:
        """Line numbers for pieces that start inside a file: every rank counts the lines of its cut pieces."""
        counts = {(p.path, p.start): count_lines(p) for p in pieces if p.end is not None}
        everyone = {}
        for rank_counts in self.group.allgather(counts):
            everyone.update(rank_counts)
        return number_lines(pieces, everyone)

    def encode(self, pieces: List[Piece], writers: Dict[str, DatasetWriter], encoder: Encoder) -> Stats:
        args = self.args
        stats = Stats(tokens={k: 0 for k in args.json_keys}, empty_documents={k: 0 for k in args.json_keys})
        progress = Progress(stats, args.log_interval, self.label, sys.stderr.isatty() and self.group.size == 1)
        try:
            with EncodingPool(encoder, args.workers) as pool:
                for encoded in pool.encode(read_batches(pieces)):
                    for line, reason in encoded.skipped:
                        self.report(f"{encoded.path}:{line}: skipped: {reason}")
                    if encoded.error:
                        stats.unreadable_files += 1
                        self.report(f"{encoded.path}: {encoded.error}")
                    for key, arrays in encoded.arrays.items():
                        writers[key].add_documents(*arrays)
                        stats.tokens[key] += len(arrays[0])
                        stats.empty_documents[key] += len(encoded.empty[key])
                        for line in encoded.empty[key]:
                            self.note(f"{encoded.path}:{line}: note: empty document ('{key}' has no tokens): "
                                      "recorded without sequences, as Megatron-LM does")
                    stats.documents += encoded.num_documents
                    stats.skipped_lines += len(encoded.skipped)
                    stats.num_bytes += encoded.num_bytes
                    progress.update(encoded.num_documents)
                    if self.group.stopped_by_other():
                        raise Stopped()
        finally:
            progress.close()
        for writer in writers.values():
            writer.close()
        return stats

    def write_my_share(self, pieces: List[Piece], writers: Dict[str, DatasetWriter], encoder: Encoder,
                       suffix: str, dtype) -> Tuple[Optional[Stats], Optional[BaseException]]:
        """This rank's own work, all in one try: its partial datasets (added to `writers` as they are opened, for
        the caller to remove) and their Stats, or what went wrong, after telling the other ranks to stop."""
        try:
            for key in self.args.json_keys:
                writers[key] = DatasetWriter(output_prefix(self.args, key) + suffix, dtype)
            return self.encode(pieces, writers, encoder), None
        except BaseException as e:
            self.group.tell_others_to_stop()
            return None, e

    def run(self) -> None:
        """Everything, on every rank. Each rank's own work is in one try, so that every rank reaches the
        collectives after it whatever happens (a rank that dies outright is mpirun's or srun's to kill)."""
        args, group = self.args, self.group
        start = time.time()
        shared, pieces, run_id = from_root(group, self.plan)
        pieces = self.number_my_pieces(pieces[group.rank])
        dtype = token_dtype(shared["vocab_size"])
        encoder = Encoder(self.tokenizer_spec(), args.json_keys, args.append_eod, args.patch_size,
                          shared["pad_id"], dtype)
        suffix = f".tmp-{run_id}" + (f"-rank{group.rank}" if group.size > 1 else "")
        writers = {}
        stats, failure = self.write_my_share(pieces, writers, encoder, suffix, dtype)
        outcomes = group.allgather(failure is None)
        group.settle([rank for rank, ok in enumerate(outcomes) if not ok])
        try:
            if failure is not None:
                raise failure
            if not all(outcomes):
                raise Stopped()
            totals = functools.reduce(Stats.add, group.allgather(stats))
            from_root(group, lambda: self.commit(shared, totals, run_id, dtype, writers))
        finally:
            for writer in writers.values():
                writer.remove()
        if group.rank == 0:
            print(self.summary(totals, time.time() - start))

    def summary(self, totals: Stats, elapsed: float) -> str:
        """The closing line of a run that took `elapsed` seconds."""
        args, group = self.args, self.group
        return (f"done: {totals.documents} documents, {sum(totals.tokens.values())} tokens, "
                f"{totals.skipped_lines} skipped lines, {sum(totals.empty_documents.values())} empty documents, "
                f"{totals.unreadable_files} unreadable files, {totals.num_bytes / 2**20:.2f} MB in {elapsed:.1f}s "
                f"({totals.documents / elapsed:.1f} docs/s, {totals.num_bytes / elapsed / 2**20:.2f} MB/s; "
                f"{group.size} rank(s) x {args.workers} worker(s)) -> "
                f"{', '.join(output_prefix(args, k) for k in args.json_keys)}")

    def commit(self, shared, totals: Stats, run_id: str, dtype, writers: Dict[str, DatasetWriter]) -> None:
        """Rank 0: move the single process's datasets into place, or concatenate the ranks' partial datasets."""
        for key, writer in writers.items():
            metadata = dict(shared, json_key=key, skipped_lines=totals.skipped_lines,
                            unreadable_files=totals.unreadable_files, empty_documents=totals.empty_documents[key])
            final = output_prefix(self.args, key)
            if self.group.size == 1:
                writer.commit(final, metadata)
                continue
            merged = DatasetWriter(f"{final}.tmp-{run_id}", dtype)
            try:
                for rank in range(self.group.size):
                    merged.add_dataset(f"{final}.tmp-{run_id}-rank{rank}")
                merged.commit(final, metadata)
            finally:
                merged.remove()
