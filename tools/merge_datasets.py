#!/usr/bin/env python3
"""Concatenate datasets written by tools/preprocess_data.py into one, in the order given.

  python tools/merge_datasets.py --input out/a_text_document out/b_text_document --output-prefix out/ab_text_document
  python tools/merge_datasets.py --input out/parts/ --output-prefix out/all_text_document

A directory stands for every dataset in it, by name (as Megatron-LM's tools/merge_datasets.py takes it). The
result is what megatron-core's IndexedDatasetBuilder.add_index builds, and what preprocess_data.py writes for the
concatenated input. The datasets must agree on what their tokens mean (their .meta.json sidecars: token dtype,
tokenizer, EOD and pad ids, patch size); the output is written under a temporary name, renamed when complete,
and gets a sidecar with the summed counts.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_patch.data.indexed import DatasetFormatError, DatasetWriter, read_sidecar  # noqa: E402

MUST_AGREE = ("dtype", "vocab_size", "tokenizer_sha256", "eod_id", "pad_id", "patch_size", "append_eod", "json_key")
SUMMED = ("skipped_lines", "unreadable_files", "empty_documents")


class MergeError(Exception):
    pass


def dataset_prefixes(inputs):
    prefixes = []
    for name in inputs:
        if os.path.isdir(name):
            found = sorted(os.path.join(name, f[: -len(".idx")]) for f in os.listdir(name) if f.endswith(".idx"))
            if not found:
                raise MergeError(f"--input: no .idx files in {name}")
            prefixes += found
        else:
            prefixes.append(name)
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(prefix + suffix):
                raise MergeError(f"--input: {prefix}{suffix} does not exist")
    return prefixes


def merged_metadata(prefixes):
    """The sidecar of the concatenation: shared fields (checked), inputs in order, summed counts."""
    sidecars = []
    for prefix in prefixes:
        meta = read_sidecar(prefix)
        if meta is None:
            raise MergeError(f"{prefix}: no {prefix}.meta.json: not written by tools/preprocess_data.py, or not "
                             "complete")
        sidecars.append(meta)
    first = sidecars[0]
    for prefix, meta in zip(prefixes[1:], sidecars[1:]):
        for key in MUST_AGREE:
            if meta.get(key) != first.get(key):
                raise MergeError(f"{prefixes[0]} and {prefix} differ in {key} ({first.get(key)} vs {meta.get(key)}): "
                                 "their tokens cannot be mixed")
    merged = dict(first, inputs=[path for meta in sidecars for path in meta["inputs"]])
    merged.update({key: sum(meta[key] for meta in sidecars) for key in SUMMED})
    return merged


def merge(prefixes, output_prefix):
    if os.path.abspath(output_prefix) in map(os.path.abspath, prefixes):
        raise MergeError(f"--output-prefix {output_prefix} is also an input")
    metadata = merged_metadata(prefixes)
    writer = DatasetWriter(f"{output_prefix}.tmp-{os.getpid()}", metadata["dtype"])
    try:
        for prefix in prefixes:
            writer.add_dataset(prefix)
        writer.commit(output_prefix, metadata)  # counts: the writer's
    finally:
        writer.remove()
    return writer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="dataset prefixes (PREFIX.bin/.idx), or directories")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx/.meta.json")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # clean-up runs on the way out
    try:
        prefixes = dataset_prefixes(args.input)
        writer = merge(prefixes, args.output_prefix)
    except (MergeError, DatasetFormatError) as e:
        sys.exit(f"merge_datasets.py: error: {e}")
    print(f"merged {len(prefixes)} datasets: {writer.num_documents} documents, {writer.num_tokens} tokens "
          f"-> {args.output_prefix}")


if __name__ == "__main__":
    main()
