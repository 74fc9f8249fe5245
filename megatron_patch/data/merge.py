"""Concatenating datasets written by tools/preprocess_data.py into one, in the order given: the work behind
tools/merge_datasets.py.

The result is what megatron-core's IndexedDatasetBuilder.add_index builds, and what preprocess_data.py writes for
the concatenated input. The datasets must agree on what their tokens mean (MUST_AGREE, from their .meta.json
sidecars); the output is written under a temporary name, renamed when complete, and gets a sidecar with the
inputs in order and the SUMMED counts.
"""

from __future__ import annotations

import os

from megatron_patch.data.indexed import DatasetWriter, read_sidecar
from megatron_patch.errors import MegatronPatchError

MUST_AGREE = ("dtype", "vocab_size", "tokenizer_sha256", "eod_id", "pad_id", "patch_size", "append_eod", "json_key")
SUMMED = ("skipped_lines", "unreadable_files", "empty_documents")


class MergeError(MegatronPatchError):
    pass


def dataset_prefixes(inputs):
    """The dataset prefixes `inputs` name: a directory stands for every dataset in it, by name, unless the name is
    itself a dataset prefix (megatron-core caches sample indices in a directory named like the prefix)."""
    prefixes = []
    for name in inputs:
        if os.path.isdir(name) and not os.path.isfile(name + ".idx"):
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
    """Writes the concatenation of `prefixes` to `output_prefix`; returns its (committed) DatasetWriter."""
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
