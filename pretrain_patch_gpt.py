#!/usr/bin/env python3
"""Entry point, Megatron-LM style: `torchrun --nproc-per-node N pretrain_patch_gpt.py --patch-size 4 ...`
(same as the `megatron-patch-train` console script). See `python pretrain_patch_gpt.py --help` and README.md."""

from megatron_patch.cli.pretrain import main

if __name__ == "__main__":  # guard: checkpoint writers may spawn processes that re-import this module
    main()
