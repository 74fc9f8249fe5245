#!/usr/bin/env python3
"""Import a HuggingFace LlamaForCausalLM / GPT2LMHeadModel directory as a checkpoint in any TP x PP layout.
Same as the `megatron-patch-import-hf` console script; see megatron_patch/cli/import_hf.py."""

from megatron_patch.cli.import_hf import main

if __name__ == "__main__":
    main()
