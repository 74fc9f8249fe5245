#!/usr/bin/env python3
"""Tokenize JSONL into Megatron `.bin/.idx` datasets (Megatron-LM's tools/preprocess_data.py conventions).

  python tools/preprocess_data.py --input data.jsonl --output-prefix out/corpus \\
      --tokenizer-model tok.model --append-eod --workers 2 [--patch-size 4]

Writes {output-prefix}_{key}_document.bin/.idx (readable by megatron-core's IndexedDataset) and a
.meta.json sidecar. With --patch-size K every document (EOD included) is padded with the tokenizer's pad id
to a multiple of K, so no patch ever mixes two documents.
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_patch.data.indexed import DatasetWriter, pad_to_patch  # noqa: E402
from megatron_patch.data.tokenizer import SentencePieceTokenizer  # noqa: E402

BATCH_LINES = 256


class BadInput(Exception):
    pass


def expand_inputs(patterns):
    paths = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(glob.glob(os.path.join(pattern, "*.jsonl")))
        else:
            found = sorted(glob.glob(pattern))
        if not found:
            raise BadInput(f"--input: nothing matches {pattern}")
        paths.extend(found)
    return paths


def read_batches(paths, json_keys, strict):
    """Yield (location, {key: text}) batches in input order; malformed lines are reported with file:line."""
    batch = []
    for path in paths:
        with open(path, "rb") as f:
            for line_number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                where = f"{path}:{line_number}"
                try:
                    obj = json.loads(raw.decode("utf-8"))
                    doc = {key: obj[key] for key in json_keys}
                    if not all(isinstance(v, str) for v in doc.values()):
                        raise TypeError("value is not a string")
                except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
                    message = f"{where}: skipped: {type(e).__name__}: {e}"
                    if strict:
                        raise BadInput(message) from None
                    print(message, file=sys.stderr)
                    batch.append((where, None))
                    continue
                batch.append((where, doc))
                if len(batch) == BATCH_LINES:
                    yield batch
                    batch = []
    if batch:
        yield batch


class Encoder:
    """Runs in each worker: tokenizes a batch of documents for every key."""

    def __init__(self, args):
        self.args = args

    def initializer(self):
        Encoder.tokenizer = SentencePieceTokenizer(self.args.tokenizer_model)

    def encode(self, batch):
        tok, args = Encoder.tokenizer, self.args
        docs = [doc for _, doc in batch if doc is not None]
        out = {}
        for key in args.json_keys:
            encoded = tok.tokenize_batch([d[key] for d in docs])
            if args.append_eod:
                encoded = [ids + [tok.eod] for ids in encoded]
            if args.patch_size > 1:
                encoded = [pad_to_patch(ids, args.patch_size, tok.pad) for ids in encoded]
            out[key] = encoded
        num_bad = len(batch) - len(docs)
        num_bytes = sum(len(d[k].encode("utf-8")) for d in docs for k in args.json_keys)
        return out, num_bad, num_bytes


def output_prefix(args, key):
    return f"{args.output_prefix}_{key}_document"


def run(args):
    paths = expand_inputs(args.input)
    tokenizer = SentencePieceTokenizer(args.tokenizer_model)
    if args.patch_size > 1 and tokenizer.pad < 0:
        raise BadInput(f"--patch-size {args.patch_size}: tokenizer {args.tokenizer_model} has no pad id")
    metadata = dict(
        tokenizer_model=os.path.abspath(args.tokenizer_model),
        eod_id=tokenizer.eod,
        pad_id=tokenizer.pad,
        patch_size=args.patch_size,
        append_eod=args.append_eod,
        inputs=[os.path.abspath(p) for p in paths],
    )
    writers = {
        key: DatasetWriter(output_prefix(args, key), tokenizer.vocab_size, dict(metadata, json_key=key))
        for key in args.json_keys
    }
    encoder = Encoder(args)
    start, docs, bad, nbytes = time.time(), 0, 0, 0
    next_log = args.log_interval
    pool = None
    try:
        if args.workers > 1:
            pool = multiprocessing.Pool(args.workers, initializer=encoder.initializer)
            results = pool.imap(encoder.encode, read_batches(paths, args.json_keys, args.strict))
        else:
            encoder.initializer()
            results = map(encoder.encode, read_batches(paths, args.json_keys, args.strict))
        for encoded, num_bad, num_bytes in results:
            for key, documents in encoded.items():
                for ids in documents:
                    writers[key].add_document(ids)
            docs += len(encoded[args.json_keys[0]])
            bad += num_bad
            nbytes += num_bytes
            if args.log_interval and docs >= next_log:
                next_log += args.log_interval * (1 + (docs - next_log) // args.log_interval)
                elapsed = time.time() - start
                print(f"processed {docs} documents ({docs / elapsed:.1f} docs/s, {nbytes / elapsed / 2**20:.2f} MB/s)",
                      file=sys.stderr)
        if pool is not None:
            pool.close()
            pool.join()
        for writer in writers.values():
            writer.finalize()
    except BaseException:
        if pool is not None:
            pool.terminate()
        for writer in writers.values():
            writer.abort()
        raise
    elapsed = time.time() - start
    tokens = sum(w.num_tokens for w in writers.values())
    print(f"done: {docs} documents, {tokens} tokens, {bad} skipped lines, {nbytes / 2**20:.2f} MB in "
          f"{elapsed:.1f}s -> {', '.join(output_prefix(args, k) for k in args.json_keys)}")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="JSONL files, globs or directories")
    parser.add_argument("--json-keys", nargs="+", default=["text"])
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--tokenizer-type", default="SentencePieceTokenizer", choices=["SentencePieceTokenizer"])
    parser.add_argument("--tokenizer-model", required=True)
    parser.add_argument("--append-eod", action="store_true")
    parser.add_argument("--patch-size", type=int, default=1, help="pad each document to a multiple of K tokens")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--log-interval", type=int, default=10000)
    parser.add_argument("--strict", action="store_true", help="stop at the first malformed line")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.patch_size < 1:
        parser.error(f"--patch-size must be >= 1, got {args.patch_size}")
    if not os.path.isfile(args.tokenizer_model):
        parser.error(f"--tokenizer-model: no such file: {args.tokenizer_model}")
    try:
        run(args)
    except BadInput as e:
        print(f"preprocess_data.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
