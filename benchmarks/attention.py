#!/usr/bin/env python3
"""Time and peak memory of core attention, forward + backward, causal: our SDPA module (attention.SDPAttention,
the default of the local layers) vs megatron-core's unfused DotProductAttention (--attention-backend unfused) vs a
bare `F.scaled_dot_product_attention(..., is_causal=True)` (the floor: what torch's kernel alone costs).

Each variant and length runs in its own process; peak memory is the growth of the process's peak RSS (VmHWM, reset
to the current RSS just before: an earlier, freed peak would hide part of the growth) over the inputs (q, k, v and
the [T, T] boolean mask megatron-core's modules take) already allocated. The child processes run with
MALLOC_MMAP_THRESHOLD_=131072 so glibc returns freed large blocks at once and RSS follows the live tensors (without it
the same run varies by +-15 MiB). fp32, batch 1, no dropout. Goals at 4096 positions: SDPA >= 3x faster and >= 8x
less peak memory than unfused, within 1.1x of the bare call.

  .venv/bin/python benchmarks/attention.py [--positions 2048 4096 --heads 8 --head-dim 64 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_patch.config.schema import ModelConfig, ParallelConfig
from megatron_patch.distributed import parallel
from megatron_patch.method.attention import SDPAttention
from megatron_patch.method.model import transformer_config

VARIANTS = ("unfused", "sdpa", "bare")


def attention_fn(variant: str, heads: int, head_dim: int):
    """(fn(q, k, v, mask) -> output) for q, k, v in megatron-core's [s, b, heads, head_dim] layout."""
    if variant == "bare":
        def bare(q, k, v, mask):
            out = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), is_causal=True)
            return out  # [b, heads, s, head_dim]: no layout change back, the floor
        return bare
    parallel.initialize(ParallelConfig(), seed=1, launch=parallel.Launch(0, 1, 0))
    model = ModelConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads, hidden_dropout=0.0,
                        attention_dropout=0.0)
    cls = SDPAttention if variant == "sdpa" else DotProductAttention
    module = cls(transformer_config(model, ParallelConfig()), layer_number=1, attn_mask_type=AttnMaskType.causal,
                 attention_type="self")
    return module


def memory_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process in KiB; ru_maxrss where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak_memory() -> None:
    """Linux: set the peak RSS to the current RSS (`echo 5 > /proc/self/clear_refs`)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def measure(variant: str, positions: int, heads: int, head_dim: int, repeats: int) -> dict:
    torch.manual_seed(0)
    fn = attention_fn(variant, heads, head_dim)
    q, k, v = (torch.randn(positions, 1, heads, head_dim, requires_grad=True) for _ in range(3))
    mask = torch.ones(positions, positions, dtype=torch.bool).triu_(1)[None, None]  # megatron-core's: True = masked
    reset_peak_memory()
    before = memory_kib("VmRSS")
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        fn(q, k, v, mask).sum().backward()
        times.append(time.perf_counter() - start)
        q.grad = k.grad = v.grad = None
    growth = memory_kib("VmHWM") - before
    return {"seconds": min(times[1:]), "peak_growth_kib": growth}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: measure one variant in this process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.positions[0], args.heads, args.head_dim, args.repeats)))
        return
    print(f"causal attention, fp32, batch 1, {args.heads} heads x {args.head_dim}, forward+backward, best of "
          f"{args.repeats}, each in a fresh process, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for positions in args.positions:
        results = {}
        for variant in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--variant", variant, "--positions", str(positions),
                                  "--heads", str(args.heads), "--head-dim", str(args.head_dim),
                                  "--repeats", str(args.repeats)], capture_output=True, text=True, check=True,
                                 env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072"))
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        unfused, sdpa, bare = (results[v] for v in VARIANTS)
        for variant, r in results.items():
            print(f"T={positions:5d} {variant:>8}: {1000 * r['seconds']:8.1f} ms   peak memory "
                  f"+{r['peak_growth_kib'] / 1024:6.0f} MiB")
        print(f"T={positions:5d} SDPA vs unfused: {unfused['seconds'] / sdpa['seconds']:.2f}x faster, "
              f"{unfused['peak_growth_kib'] / sdpa['peak_growth_kib']:.1f}x less peak memory; SDPA vs bare call: "
              f"{sdpa['seconds'] / bare['seconds']:.2f}x the time, "
              f"{sdpa['peak_growth_kib'] / bare['peak_growth_kib']:.2f}x the peak memory")


if __name__ == "__main__":
    main()
