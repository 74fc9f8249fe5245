#!/usr/bin/env python3
"""Export a checkpoint as a HuggingFace model directory (LlamaForCausalLM or GPT2LMHeadModel) for lm-eval.
Same as the `megatron-patch-export-hf` console script; see megatron_patch/cli/export_hf.py."""

from megatron_patch.cli.export_hf import main

if __name__ == "__main__":
    main()
