#!/usr/bin/env python3
"""A grid of runs (model sizes x K x lambda x token budget x seeds): trained one after another or submitted to
Slurm, each evaluated at token level, compared in one table and plots. Same as the `megatron-patch-sweep` console
script; see megatron_patch/cli/sweep.py and megatron_patch/experiments/sweep.py (the grid file)."""

from megatron_patch.cli.sweep import main

if __name__ == "__main__":
    main()
