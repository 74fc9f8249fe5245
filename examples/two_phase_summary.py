#!/usr/bin/env python3
"""Compare the two phases of a run from their --log-json files: loss, throughput, and the cost of the
two-phase schedule relative to token-level training on the same number of tokens.

  python examples/two_phase_summary.py runs/quickstart/log.phase1.jsonl runs/quickstart/log.phase2.jsonl
"""

import sys

from megatron_patch.training.json_log import last_summary


def summary(path):
    found = last_summary(path)
    if found is None:
        sys.exit(f"{path}: no phase summary (did the phase finish?)")
    return found


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    p1, p2 = summary(sys.argv[1]), summary(sys.argv[2])
    k = p1["patch_size"]
    total = p1["tokens"] + p2["tokens"]
    lam = p1["tokens"] / total
    ideal = lam / k + 1 - lam
    # Measured: wall time of both phases vs. all tokens at phase 2's (token-level) throughput.
    measured = (p1["seconds"] + p2["seconds"]) / (total / p2["tokens_per_sec"])
    for name, p in (("phase 1 (patch)", p1), ("phase 2 (token)", p2)):
        print(f"{name}: K={p['patch_size']} {p['iterations']} iterations, {p['tokens']} tokens, "
              f"train loss {p['first_train_loss']:.3f} -> {p['final_train_loss']:.3f}, "
              f"validation loss {p['valid_loss']:.3f}, {p['tokens_per_sec']:.0f} tokens/s")
    print(f"phase-1 speed-up: {p1['tokens_per_sec'] / p2['tokens_per_sec']:.2f}x tokens/s (ideal ~K={k})")
    print(f"cost vs token-level training on {total} tokens: lambda={lam:.3f}, ideal lambda/K+1-lambda = "
          f"{ideal:.3f}, measured {measured:.3f}")


if __name__ == "__main__":
    main()
