#!/usr/bin/env python3
"""Print the two-phase plan a training command would run, without running it (no torch: login nodes).
Same as the `megatron-patch-plan` console script; see megatron_patch/cli/plan.py."""

from megatron_patch.cli.plan import main

if __name__ == "__main__":
    main()
