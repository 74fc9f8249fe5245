"""The small corpus the benchmarks train on when not given one: Python's documentation (what tests/conftest.py
builds), a 1000-piece SentencePiece tokenizer, preprocessed plain and patch-aligned."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


def build_corpus(out: str, documents: int = 160, patch_size: int = 1) -> tuple:
    """(dataset prefix, tokenizer model) of `documents` documents, preprocessed with --patch-size `patch_size`."""
    full, docs = os.path.join(out, "full.jsonl"), os.path.join(out, "docs.jsonl")
    subprocess.run([PYTHON, "examples/python_docs_corpus.py", "--output", full], cwd=ROOT, check=True,
                   capture_output=True)
    with open(full) as f, open(docs, "w") as g:
        g.writelines(f.readlines()[:documents])
    subprocess.run([PYTHON, "tools/train_tokenizer.py", "--input", docs, "--model-prefix", f"{out}/tok",
                    "--vocab-size", "1000"], cwd=ROOT, check=True, capture_output=True)
    subprocess.run([PYTHON, "tools/preprocess_data.py", "--input", docs, "--tokenizer-model", f"{out}/tok.model",
                    "--append-eod", "--patch-size", str(patch_size), "--output-prefix", f"{out}/docs"],
                   cwd=ROOT, check=True, capture_output=True)
    return f"{out}/docs_text_document", f"{out}/tok.model"
