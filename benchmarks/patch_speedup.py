#!/usr/bin/env python3
"""Phase-1 (K=4) vs phase-2 (K=1) training throughput at the same tokens per step, against the ideal ratio.

Same model and same tokens per optimizer step; phase 1 reads K*T tokens per sample and runs the transformer on
T positions, phase 2 reads T tokens per sample with K times as many samples. Prints tokens/s of both, the
measured ratio, and the ideal ratio from the model's FLOPs (which is ~K: the embedding lookup and the mean
are the only per-token work left in phase 1).

  .venv/bin/python benchmarks/patch_speedup.py [--steps 20] [--layers 6 --hidden 256]
"""

from __future__ import annotations

import argparse
import time

import torch

from megatron_patch.config.schema import ModelConfig, ParallelConfig
from megatron_patch.distributed import parallel
from megatron_patch.method.model import build_model


def transformer_flops(cfg: ModelConfig, vocab: int, positions: int, batch: int) -> float:
    """Forward+backward FLOPs (6 x multiply-adds) of one step: layers, attention scores and output layer."""
    h, ffn = cfg.hidden_size, cfg.ffn_hidden_size
    mlp = (3 if cfg.swiglu else 2) * h * ffn
    per_position = cfg.num_layers * (4 * h * h + mlp + 2 * positions * h) + h * vocab
    return 6.0 * per_position * positions * batch


def measure(cfg, vocab, k, positions, batch, steps, warmup=3):
    torch.manual_seed(0)
    model = build_model(cfg, ParallelConfig(), vocab, patch_size=k)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, vocab, (batch, positions * k))
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        optimizer.zero_grad()
        model(tokens, None, None, labels=tokens).mean().backward()
        optimizer.step()
    return steps * batch * positions * k / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--positions", type=int, default=256, help="transformer positions T in both phases")
    parser.add_argument("--tokens-per-step", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    k, T = args.patch_size, args.positions
    parallel.initialize(ParallelConfig(), seed=0, launch=parallel.Launch(0, 1, 0))
    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.hidden // 64,
                      ffn_hidden_size=args.hidden * 8 // 3, max_position_embeddings=T, normalization="RMSNorm",
                      swiglu=True, position_embedding_type="rope", add_bias_linear=False,
                      untie_embeddings_and_output_weights=True, hidden_dropout=0.0, attention_dropout=0.0)
    batch2 = args.tokens_per_step // T          # phase 2: T tokens per sample
    batch1 = args.tokens_per_step // (k * T)    # phase 1: K*T tokens per sample, same tokens per step
    token_level = measure(cfg, args.vocab, 1, T, batch2, args.steps)
    patch_level = measure(cfg, args.vocab, k, T, batch1, args.steps)
    ideal = transformer_flops(cfg, args.vocab, T, batch2) / transformer_flops(cfg, args.vocab, T, batch1)
    measured = patch_level / token_level
    print(f"model: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; {args.tokens_per_step} tokens/step, "
          f"{T} positions; torch threads {torch.get_num_threads()}")
    print(f"phase 2 (K=1): {token_level:,.0f} tokens/s")
    print(f"phase 1 (K={k}): {patch_level:,.0f} tokens/s")
    print(f"measured speed-up {measured:.2f}x, FLOP ratio {ideal:.2f}x, measured / FLOP ratio = {measured / ideal:.3f} "
          f"(target >= 0.95)")
    parallel.destroy()


if __name__ == "__main__":
    main()
