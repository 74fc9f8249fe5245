#!/usr/bin/env python3
"""Token-level loss, perplexity and bits per byte of any checkpoint, on a dataset split or raw text (same as the
`megatron-patch-evaluate` console script; see megatron_patch/cli/evaluate.py and `--help`)."""

from megatron_patch.cli.evaluate import main

if __name__ == "__main__":
    main()
