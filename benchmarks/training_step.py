#!/usr/bin/env python3
"""A whole training step at long sequences, on CPU: tokens/s and peak memory with each core-attention backend
(--attention-backend auto = our SDPA module, unfused = megatron-core's DotProductAttention) and with full activation
recompute on and off, at seq 2048 (K=1: 2048 positions) and seq 8192 (K=4: 2048 patch positions, the paper's
phase-1 shape).

Each configuration is the trainer (pretrain_patch_gpt.py) in a fresh process: micro-batch 1, global batch 1, the
cpu-small LLaMA preset (4 layers, hidden 128; --num-layers/--hidden-size to change), fp32. tokens/s is the median over
the steps after the first; peak memory is the process's peak RSS (the trainer's logged peak_memory_bytes).

  .venv/bin/python benchmarks/training_step.py [--steps 4] [--num-layers 4 --hidden-size 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile

from corpus import PYTHON, ROOT, build_corpus

SHAPES = [(2048, 1), (8192, 4)]  # (tokens per sample, K)
BACKENDS = ["auto", "unfused"]
RECOMPUTE = {"off": [], "full": ["--recompute-granularity", "full", "--recompute-method", "uniform",
                                 "--recompute-num-layers", "1"]}


def measure(flags: list, log: str) -> tuple:
    """(median tokens/s after the first step, peak RSS bytes) of one trainer run."""
    result = subprocess.run([PYTHON, "pretrain_patch_gpt.py", *flags, "--log-json", log], cwd=ROOT,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"training failed ({' '.join(flags)}):\n{result.stderr[-2000:]}")
    steps = [record for record in map(json.loads, open(log)) if "loss" in record]
    return statistics.median(r["tokens_per_sec"] for r in steps[1:]), max(r["peak_memory_bytes"] for r in steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, tokenizer = build_corpus(tmp, documents=400, patch_size=4)
        print("| tokens per sample | K | positions | attention | recompute | tokens/s | peak memory |")
        print("|---|---|---|---|---|---|---|")
        for seq_length, k in SHAPES:
            for backend in BACKENDS:
                for recompute, recompute_flags in RECOMPUTE.items():
                    name = f"{seq_length}_{k}_{backend}_{recompute}"
                    flags = ["--model-preset", "cpu-small", "--num-layers", str(args.num_layers), "--hidden-size",
                             str(args.hidden_size), "--patch-size", str(k), "--seq-length", str(seq_length),
                             "--max-position-embeddings", str(seq_length // k), "--micro-batch-size", "1",
                             "--global-batch-size", "1", "--train-iters", str(args.steps), "--lr-warmup-iters", "1",
                             "--split", "100,0,0", "--data-path", data, "--tokenizer-model", tokenizer,
                             "--data-cache-path", f"{tmp}/cache", "--log-interval", "1",
                             "--attention-backend", backend, *recompute_flags]
                    tokens_per_sec, peak = measure(flags, f"{tmp}/{name}.jsonl")
                    print(f"| {seq_length} | {k} | {seq_length // k} | {backend} | {recompute} | "
                          f"{tokens_per_sec:.0f} | {peak / 2**20:.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
