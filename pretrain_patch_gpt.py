#!/usr/bin/env python3
"""Entry point, Megatron-LM style: `torchrun --nproc-per-node N pretrain_patch_gpt.py --patch-size 4 ...`
(same as the `megatron-patch-train` console script). See `python pretrain_patch_gpt.py --help` and README.md."""

if __name__ == "__main__":
    # Imported here, not at the top: torch_dist's checkpoint writer spawns a helper process that re-imports this
    # module, and it needs nothing of torch or megatron-core (importing them cost it ~5 s per run on a CPU).
    from megatron_patch.cli.pretrain import main

    main()
