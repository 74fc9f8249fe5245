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
import signal
import sys

from megatron_patch.data.merge import dataset_prefixes, merge
from megatron_patch.errors import OneLineErrorParser, one_line_errors


def build_parser():
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="dataset prefixes (PREFIX.bin/.idx), or directories")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx/.meta.json")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # clean-up runs on the way out
    with one_line_errors("merge_datasets.py", exit_code=1):
        prefixes = dataset_prefixes(args.input)
        writer = merge(prefixes, args.output_prefix)
    print(f"merged {len(prefixes)} datasets: {writer.num_documents} documents, {writer.num_tokens} tokens "
          f"-> {args.output_prefix}")

