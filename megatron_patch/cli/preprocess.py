"""Tokenize text into Megatron `.bin/.idx` datasets, with Megatron-LM's tools/preprocess_data.py flags.

  python tools/preprocess_data.py --input data/*.jsonl.gz --output-prefix out/corpus \\
      --tokenizer-model tok.model --append-eod --workers 8 [--patch-size 4]
  ... --tokenizer-type HuggingFaceTokenizer --tokenizer-model hf_dir_or_tokenizer.json
  ... --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt --pad-id 0
  ... --tokenizer-type NullTokenizer --vocab-size 32000       (text: space-separated ids)
  mpirun -np 16 python tools/preprocess_data.py ...   (or srun: every rank takes a share of the input)

Inputs: files, globs, directories; JSON lines (`.jsonl`, one document per line, --json-keys select the fields:
a string, or a list of strings = one sequence each) or plain text (`.txt`, one document per line); `.gz`/`.zst`
compressed or not. Output: {output-prefix}_{key}_document.bin/.idx, readable by megatron-core's IndexedDataset and
byte for byte what Megatron-LM writes (token dtype uint16 below 65500 ids, else int32), plus a .meta.json
sidecar (tokenizer, ids, counts). --patch-size K pads every document (EOD included) with the pad id to a multiple
of K, so no patch ever mixes two documents.

Like Megatron-LM, a document that has no tokens gets no EOD and no sequence (it is still a document of the
index). Lines that cannot be used (malformed JSON, a missing key, bytes that are not UTF-8) and unreadable files
are skipped and reported as FILE:LINE (--strict: the first one stops the run); blank JSON lines are ignored.
Outputs are written under temporary names and renamed only when complete; an existing dataset is never damaged
by a failed or interrupted run.

Under MPI (mpirun/srun with more than one rank, or --mpi) each rank tokenizes a consecutive share of the input
bytes (files are cut at line starts; compressed files go whole to one rank), writes a partial dataset, and rank 0
concatenates them in rank order: the result is identical to a single process's. The output directory must be
shared by the ranks. If any rank fails, every rank exits non-zero and no output is written.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from megatron_patch.config.tokenizer import add_tokenizer_arguments
from megatron_patch.data.preprocess import (
    Job,
    ReportedOnRoot,
    Stopped,
    Terminated,
    process_group,
    raise_terminated,
)
from megatron_patch.errors import OneLineErrorParser, fail, one_line_errors


def build_parser():
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input data")
    group.add_argument("--input", nargs="+", required=True,
                       help="files, globs or directories: .jsonl/.json (JSON lines) or .txt, optionally .gz/.zst")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize, one dataset each")
    group = parser.add_argument_group("tokenizer")
    add_tokenizer_arguments(group)
    group = parser.add_argument_group("tokenization process")
    group.add_argument("--append-eod", action="store_true", help="append the EOD id to every document")
    group.add_argument("--patch-size", type=int, default=1,
                       help="pad each document (EOD included) with the pad id to a multiple of K tokens")
    group.add_argument("--pad-id", type=int, default=None,
                       help="the id padding documents to whole patches (default: the tokenizer's pad id; "
                            "tokenizers without one, like LLaMA-2's, need it); the trainer masks it from the loss")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/.idx/.meta.json")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes (per MPI rank)")
    group.add_argument("--log-interval", type=int, default=1000, help="documents between progress lines (0: none)")
    group.add_argument("--strict", action="store_true", help="stop at the first unusable line or file")
    group.add_argument("--mpi", action="store_true",
                       help="share the work between MPI ranks (automatic under mpirun/srun with MPI)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.patch_size < 1:
        parser.error(f"--patch-size must be >= 1, got {args.patch_size}")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    signal.signal(signal.SIGTERM, raise_terminated)
    prog = os.path.basename(sys.argv[0])
    try:
        with one_line_errors(prog, exit_code=1):
            group = process_group(args.mpi)
            Job(args, group).run()
    except (Stopped, ReportedOnRoot):
        sys.exit(1)
    except OSError as e:  # a full disk, an unwritable output directory: the file and the OS's reason
        fail(prog, f"{e} (unfinished outputs removed)", 1)
    except (KeyboardInterrupt, Terminated) as e:
        print(f"{prog}: interrupted ({e or 'SIGINT'}): unfinished outputs removed", file=sys.stderr)
        sys.exit(1)

