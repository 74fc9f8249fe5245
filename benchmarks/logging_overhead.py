#!/usr/bin/env python3
"""Step time of a short training run with and without TensorBoard logging (--tensorboard-dir): the overhead of
experiment tracking. Goal: < 1%.

Each run is its own process running the trainer (pretrain_patch_gpt.py's main) unchanged, except that a timestamp
is taken when each step's logging has returned (PhaseLog.step: the --log-json line, the TensorBoard scalars): a
step's time here is compute + data + all its logging, which the trainer's own step time leaves out. Step time =
(last - first) / (steps - 1): the first step (warm-up) is not counted. Both wall time and the process's CPU time
(every thread: the TensorBoard writer's included) are taken, and the time spent in the step's TensorBoard calls
(Trackers.log: add_scalar; the writer thread serialises and writes). Runs alternate without/with TensorBoard,
`--repeats` of each; the ratios are of the fastest and of the median of each. No validation and no checkpoint
(--split 100,0,0, no --save): only steps and their logging are timed.

  .venv/bin/python benchmarks/logging_overhead.py                       # builds a small corpus (like the tests)
  .venv/bin/python benchmarks/logging_overhead.py --data-path runs/quickstart/docs_text_document \\
      --tokenizer-model runs/quickstart/tokenizer.model                   # the quick start's data
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from corpus import PYTHON, ROOT, build_corpus

# The trainer (pretrain_patch_gpt.py's main), a timestamp taken after each step's logging.
TIMED_TRAINER = """
import json, sys, time
from megatron_patch.cli.pretrain import main
from megatron_patch.training.trackers import Trackers
from megatron_patch.training.phase_log import PhaseLog
step, log = PhaseLog.step, Trackers.log
stamps, in_trackers = [], [0.0]
def timed_step(self, stats, seconds):
    step(self, stats, seconds)
    stamps.append((time.perf_counter(), time.process_time()))
def timed_log(self, scalars, tokens):
    started = time.perf_counter()
    log(self, scalars, tokens)
    in_trackers[0] += time.perf_counter() - started
PhaseLog.step, Trackers.log = timed_step, timed_log
try:
    main(sys.argv[1:])
finally:
    print("STEP_STAMPS " + json.dumps({"stamps": stamps, "in_trackers": in_trackers[0]}), flush=True)
"""


def step_seconds(flags: list, threads) -> tuple:
    """(wall, CPU, in Trackers.log) seconds per step: CPU is the process's, all threads (TensorBoard's writer thread
    included); the last is the time the step's TensorBoard calls take (add_scalar: nothing is written without
    --tensorboard-dir)."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    result = subprocess.run([PYTHON, "-c", TIMED_TRAINER, *flags], cwd=ROOT,
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"training failed (exit {result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    line = next(line for line in result.stdout.splitlines() if line.startswith("STEP_STAMPS "))
    found = json.loads(line[len("STEP_STAMPS "):])
    stamps, steps = found["stamps"], len(found["stamps"])
    return (*((last - first) / (steps - 1) for first, last in zip(stamps[0], stamps[-1])), found["in_trackers"] / steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", help="a preprocessed dataset prefix (default: build a small corpus)")
    parser.add_argument("--tokenizer-model", help="its SentencePiece model")
    parser.add_argument("--model-preset", default="cpu-small")
    parser.add_argument("--patch-size", type=int, default=1)
    parser.add_argument("--seq-length", type=int, default=256, help="tokens per sample")
    parser.add_argument("--global-batch-size", type=int, default=32)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant, alternating")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the runs (default: torch's choice); 1 "
                                                    "makes CPU time a load-independent measure on a shared machine")
    args = parser.parse_args()
    if (args.data_path is None) != (args.tokenizer_model is None):
        parser.error("give both --data-path and --tokenizer-model, or neither")
    with tempfile.TemporaryDirectory() as tmp:
        data, tokenizer = (args.data_path, args.tokenizer_model) if args.data_path else build_corpus(tmp)
        common = ["--model-preset", args.model_preset, "--patch-size", str(args.patch_size),
                  "--seq-length", str(args.seq_length), "--global-batch-size", str(args.global_batch_size),
                  "--micro-batch-size", str(args.micro_batch_size), "--train-iters", str(args.steps),
                  "--lr-warmup-iters", "2", "--data-path", data, "--tokenizer-model", tokenizer,
                  "--data-cache-path", f"{tmp}/cache", "--split", "100,0,0", "--log-interval", "10"]
        times = {"plain": [], "tensorboard": []}
        for repeat in range(args.repeats):
            for variant in times:
                run_dir = f"{tmp}/{variant}{repeat}"
                extra = ["--log-json", f"{run_dir}/log.jsonl"]
                if variant == "tensorboard":
                    extra += ["--tensorboard-dir", f"{run_dir}/tb"]
                times[variant].append(step_seconds(common + extra, args.threads))
                wall, cpu, trackers = times[variant][-1]
                print(f"repeat {repeat + 1}/{args.repeats} {variant:11s}: {1000 * wall:.1f} ms/step wall, "
                      f"{1000 * cpu:.1f} ms/step CPU, {1000 * trackers:.3f} ms/step in Trackers.log", flush=True)
    print(f"{args.steps} steps of {args.global_batch_size * args.seq_length} tokens, {args.model_preset}, "
          f"K={args.patch_size}, OMP_NUM_THREADS={args.threads or 'default'}, {args.repeats} runs each:")
    for index, clock in enumerate(("wall", "CPU")):
        plain = [t[index] for t in times["plain"]]
        tensorboard = [t[index] for t in times["tensorboard"]]
        for name, pick in (("fastest", min), ("median", statistics.median)):
            ratio = pick(tensorboard) / pick(plain)
            print(f"  {clock:4s} {name:7s}: without TensorBoard {1000 * pick(plain):.1f} ms/step, with "
                  f"{1000 * pick(tensorboard):.1f} ms/step, ratio {ratio:.4f} ({100 * (ratio - 1):+.2f}%)")
    in_trackers = statistics.median(t[2] for t in times["tensorboard"])
    fastest = min(t[0] for t in times["tensorboard"])
    print(f"  TensorBoard calls (Trackers.log, median): {1000 * in_trackers:.3f} ms/step = "
          f"{100 * in_trackers / fastest:.3f}% of the fastest step with TensorBoard")

if __name__ == "__main__":
    main()
