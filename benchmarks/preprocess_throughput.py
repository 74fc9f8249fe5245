#!/usr/bin/env python3
"""Preprocessing throughput: tools/preprocess_data.py against Megatron-LM's encoding loop, at 1 and 2 workers.

The corpus is real text (examples/python_docs_corpus.py, the Python documentation), repeated to --copies x 2.3 MB.
The tokenizer (--tokenizer):
  sentencepiece  a pretrained 32k SentencePiece model (mistral-common's tokenizer.model.v1, LLaMA-2-shaped);
  huggingface    a 32k byte-level BPE in HuggingFace's tokenizer.json format (GPT-2/LLaMA-3-style), trained on one
                 copy of the corpus by tools/train_tokenizer.py --type bpe (no pretrained one is on this machine),
                 passed as --tokenizer-type HuggingFaceTokenizer.
Each configuration runs in its own process, --repeats times (the fastest run is shown), with its CPU time per MB
(all its processes; unlike wall time it hardly moves when other jobs share the machine); peak memory is the largest
sum over the process and its children of their proportional set size (PSS: resident memory, pages shared between
processes split among them; sampled every 50 ms).

The baseline RE-IMPLEMENTS Megatron-LM's tools/preprocess_data.py loop (Megatron-LM itself cannot be installed
here): a Pool of --workers processes with Encoder.initializer building megatron-core's tokenizer of that type (the
HuggingFace one as Megatron-LM's current build_tokenizer does: use_fast, include_special_tokens),
`pool.imap(encoder.encode, input_file, 32)` with one json.loads and one tokenizer call per document, and the main
process adding each document to megatron-core's IndexedDatasetBuilder. Both write the same bytes (checked).

  .venv/bin/python benchmarks/preprocess_throughput.py [--tokenizer sentencepiece|huggingface] [--copies 12]
      [--workers 1 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from importlib import resources

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class MegatronLMEncoder:
    """Megatron-LM's Encoder (tools/preprocess_data.py), without sentence splitting, re-implemented."""

    def __init__(self, tokenizer_model, library):
        self.tokenizer_model = tokenizer_model
        self.library = library

    def initializer(self):
        from megatron.core.tokenizers import MegatronTokenizer

        if self.library == "sentencepiece":
            options = dict(legacy=False, special_tokens=None)
        else:
            # Megatron-LM's current defaults: one fast-tokenizer call per document (`tokenizer(text).input_ids`).
            # This BPE adds no special tokens, so the ids equal ours; megatron-core 0.16's default
            # (include_special_tokens=False) goes through Python token strings and is several times slower.
            options = dict(use_fast=True, include_special_tokens=True, additional_special_tokens=[])
        MegatronLMEncoder.tokenizer = MegatronTokenizer.from_pretrained(
            tokenizer_path=self.tokenizer_model, metadata_path={"library": self.library}, **options)

    def encode(self, json_line):
        data = json.loads(json_line)
        text = data["text"]
        doc_ids, sentence_lens = [], []
        for sentence in text if isinstance(text, list) else [text]:
            sentence_ids = MegatronLMEncoder.tokenizer.tokenize(sentence)
            if sentence_ids:
                doc_ids.extend(sentence_ids)
                sentence_lens.append(len(sentence_ids))
        if doc_ids:
            doc_ids.append(MegatronLMEncoder.tokenizer.eod)
            sentence_lens[-1] += 1
        return {"text": doc_ids}, {"text": sentence_lens}, len(json_line)


def megatron_lm_baseline(input_path, tokenizer_model, library, output_prefix, workers):
    """Megatron-LM's Partition.process_json_file loop for one file and the key "text", with --append-eod."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    encoder = MegatronLMEncoder(tokenizer_model, library)
    encoder.initializer()
    builder = IndexedDatasetBuilder(f"{output_prefix}.bin",
                                    dtype=DType.optimal_dtype(MegatronLMEncoder.tokenizer.vocab_size))
    with open(input_path, encoding="utf-8") as fin:
        pool = multiprocessing.Pool(workers, initializer=encoder.initializer)
        for doc, sentence_lens, _ in pool.imap(encoder.encode, fin, 32):
            builder.add_document(doc["text"], sentence_lens["text"])
        builder.finalize(f"{output_prefix}.idx")
        pool.close()
        pool.join()


def measure(cmd):
    """(seconds, CPU seconds, peak memory in MiB) of a command and the processes it starts. CPU time (user + system,
    the last sample of each process) shows the work done even when other jobs share the machine."""
    start = time.perf_counter()
    proc = psutil.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    peak, cpu = 0, {}
    while proc.poll() is None:
        try:
            tree = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_full_info().pss for p in tree))
            cpu.update({p.pid: sum(p.cpu_times()[:2]) for p in tree})
        except psutil.Error:
            pass
        time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return time.perf_counter() - start, sum(cpu.values()), peak / 2**20


def tokenizer_under_test(kind, corpus, tmp):
    """(the tokenizer's path, how to describe it, preprocess_data.py's flags for it)."""
    if kind == "sentencepiece":
        model = str(resources.files("mistral_common") / "data" / "tokenizer.model.v1")
        return model, f"{model} (32k SentencePiece)", ["--tokenizer-model", model]
    model = os.path.join(tmp, "bpe")
    subprocess.run([sys.executable, "tools/train_tokenizer.py", "--type", "bpe", "--input", corpus, "--model-prefix",
                    model, "--vocab-size", "32000"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return (model, "32k byte-level BPE, HuggingFace tokenizer.json (trained on the corpus)",
            ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", model])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=12, help="times the 2.3 MB corpus is repeated")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration; the fastest is shown")
    parser.add_argument("--tokenizer", choices=["sentencepiece", "huggingface"], default="sentencepiece")
    parser.add_argument("--baseline", nargs=5, metavar=("INPUT", "MODEL", "LIBRARY", "PREFIX", "WORKERS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        input_path, model, library, prefix, workers = args.baseline
        return megatron_lm_baseline(input_path, model, library, prefix, int(workers))

    with tempfile.TemporaryDirectory() as tmp:
        one = os.path.join(tmp, "one.jsonl")
        subprocess.run([sys.executable, "examples/python_docs_corpus.py", "--output", one], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        model, description, our_flags = tokenizer_under_test(args.tokenizer, one, tmp)
        corpus = os.path.join(tmp, "corpus.jsonl")
        with open(one) as f, open(corpus, "w") as out:
            text = f.read()
            out.write(text * args.copies)
        size_mb = os.path.getsize(corpus) / 2**20
        num_docs = text.count("\n") * args.copies
        print(f"corpus: {num_docs} documents, {size_mb:.1f} MB; tokenizer: {description}")
        print(f"{'':34} {'workers':>7} {'seconds':>7} {'docs/s':>6} {'MB/s':>5} {'CPU s/MB':>8} {'peak PSS':>9}")
        for workers in args.workers:
            runs = {
                "Megatron-LM loop (re-implemented)": [sys.executable, __file__, "--baseline", corpus, model,
                                                      args.tokenizer, os.path.join(tmp, "megatron"), str(workers)],
                "tools/preprocess_data.py": [sys.executable, "tools/preprocess_data.py", "--input", corpus,
                                             *our_flags, "--output-prefix", os.path.join(tmp, "ours"),
                                             "--append-eod", "--workers", str(workers), "--log-interval", "0"],
            }
            for name, cmd in runs.items():
                # The fastest of --repeats runs: other work on the machine only ever slows a run down.
                seconds, cpu, peak = min(measure(cmd) for _ in range(args.repeats))
                print(f"{name:34} {workers:>7} {seconds:>7.1f} {num_docs / seconds:>6.0f} {size_mb / seconds:>5.2f} "
                      f"{cpu / size_mb:>8.3f} {peak:>5.0f} MiB", flush=True)
            for suffix in (".bin", ".idx"):
                with open(os.path.join(tmp, "megatron" + suffix), "rb") as a, \
                        open(os.path.join(tmp, "ours_text_document" + suffix), "rb") as b:
                    assert a.read() == b.read(), f"outputs differ ({suffix})"


if __name__ == "__main__":
    main()
