"""Training a SentencePiece tokenizer on JSONL or plain-text files: the work behind tools/train_tokenizer.py.

Ids: 0 <unk>, 1 <s>, 2 </s> (EOD), 3 <pad> (patch-alignment padding). Byte fallback keeps every input
encodable, as in LLaMA's tokenizer.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import sentencepiece as spm


def iter_texts(paths, json_key):
    """The documents of `paths`: `.jsonl` files give each line's `json_key` (other lines are reported on stderr
    and skipped), other files each line."""
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


def train_sentencepiece(inputs, json_key, model_prefix, vocab_size, model_type, input_sentence_size, threads):
    """Writes model_prefix.model and model_prefix.vocab, trained on the documents of `inputs`."""
    # SentencePiece reads one sentence per line: flatten each document's lines into a temporary file.
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as tmp:
        for text in iter_texts(inputs, json_key):
            for line in text.splitlines():
                if line.strip():
                    tmp.write(line.strip() + "\n")
    try:
        spm.SentencePieceTrainer.train(
            input=tmp.name,
            model_prefix=model_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=1.0,
            byte_fallback=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=threads,
            minloglevel=2,
        )
    finally:
        os.remove(tmp.name)
