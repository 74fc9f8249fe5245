#!/usr/bin/env python3
"""Compare runs from their training logs: a 2x2 figure (token-level validation and train loss against cumulative
model FLOPs and tokens) and a table. Same as the `megatron-patch-plot-runs` console script; see
megatron_patch/cli/plot_runs.py."""

from megatron_patch.cli.plot_runs import main

if __name__ == "__main__":
    main()
