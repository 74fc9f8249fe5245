#!/usr/bin/env python3
"""Time and peak memory of the K-target loss: fused (one softmax per position) vs K separate cross-entropy calls
vs one single-target cross-entropy (what token-level training pays per position).

Each variant runs forward + backward in its own process; peak memory is the growth of the process's peak RSS
over the inputs (logits, labels) already allocated, so it includes the logits' gradient every variant needs.
Target: fused <= 1.2x the time and <= 1.1x the peak memory of single-target CE.

  .venv/bin/python benchmarks/fused_patch_loss.py [--vocab 32000 --patch-size 4 --positions 2048 --repeats 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from megatron_patch.method.patching import patch_cross_entropy


def loss_fn(variant: str, k: int):
    if variant == "fused":
        return lambda logits, labels: patch_cross_entropy(logits, labels, k).mean()
    if variant == "separate":
        def separate(logits, labels):  # what a naive implementation does: K full log-softmaxes
            T, b, V = logits.shape
            targets = labels.view(b, T, k)
            flat = logits.transpose(0, 1).reshape(b * T, V)
            return sum(F.cross_entropy(flat, targets[..., j].reshape(-1)) for j in range(k)) / k
        return separate
    if variant == "single":
        return lambda logits, labels: F.cross_entropy(logits.transpose(0, 1).reshape(-1, logits.size(-1)),
                                                      labels[:, ::k].reshape(-1))
    raise ValueError(variant)


def measure(variant: str, vocab: int, k: int, positions: int, repeats: int) -> dict:
    torch.manual_seed(0)
    logits = torch.randn(positions, 1, vocab, requires_grad=True)
    labels = torch.randint(0, vocab, (1, positions * k))
    fn = loss_fn(variant, k)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn(logits, labels).backward()  # warm-up
    logits.grad = None
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(logits, labels).backward()
        times.append(time.perf_counter() - start)
        logits.grad = None
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {"seconds": sorted(times)[len(times) // 2], "peak_growth_kib": growth}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--positions", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: measure one variant in this process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.vocab, args.patch_size, args.positions, args.repeats)))
        return
    results = {}
    for variant in ("single", "separate", "fused"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--vocab", str(args.vocab),
                              "--patch-size", str(args.patch_size), "--positions", str(args.positions),
                              "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
        results[variant] = json.loads(out.stdout)
    logits_mib = args.positions * args.vocab * 4 / 2**20
    print(f"vocab {args.vocab}, K={args.patch_size}, {args.positions} positions (logits {logits_mib:.0f} MiB fp32), "
          f"forward+backward, median of {args.repeats}, torch threads {torch.get_num_threads()}")
    single = results["single"]
    for variant, r in results.items():
        print(f"{variant:>9}: {1000 * r['seconds']:8.1f} ms  ({r['seconds'] / single['seconds']:.2f}x time)   "
              f"peak memory +{r['peak_growth_kib'] / 1024:5.0f} MiB "
              f"({r['peak_growth_kib'] / single['peak_growth_kib']:.2f}x)")


if __name__ == "__main__":
    main()
