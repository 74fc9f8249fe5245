#!/usr/bin/env python3
"""Train a SentencePiece tokenizer on JSONL or plain-text files.

  python tools/train_tokenizer.py --input corpus.jsonl --model-prefix tok --vocab-size 8000

Ids: 0 <unk>, 1 <s>, 2 </s> (EOD), 3 <pad> (patch-alignment padding). Byte fallback keeps every input
encodable, as in LLaMA's tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import sentencepiece as spm


def iter_texts(paths, json_key):
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line_number, line in enumerate(f, 1):
                if not path.endswith(".jsonl"):
                    yield line.rstrip("\n")
                    continue
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)[json_key]
                except (json.JSONDecodeError, KeyError, TypeError):
                    print(f"{path}:{line_number}: skipped (not a JSON object with key '{json_key}')", file=sys.stderr)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl (one object per line) or .txt files")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    parser.add_argument("--input-sentence-size", type=int, default=1_000_000, help="sentences sampled for training")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    for path in args.input:
        if not os.path.isfile(path):
            parser.error(f"--input: no such file: {path}")

    # SentencePiece reads one sentence per line: flatten each document's lines into a temporary file.
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as tmp:
        for text in iter_texts(args.input, args.json_key):
            for line in text.splitlines():
                if line.strip():
                    tmp.write(line.strip() + "\n")
    try:
        spm.SentencePieceTrainer.train(
            input=tmp.name,
            model_prefix=args.model_prefix,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            character_coverage=1.0,
            byte_fallback=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            input_sentence_size=args.input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=args.threads,
            minloglevel=2,
        )
    finally:
        os.remove(tmp.name)
    print(f"wrote {args.model_prefix}.model ({args.vocab_size} pieces)")


if __name__ == "__main__":
    main()
