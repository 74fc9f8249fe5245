#!/usr/bin/env python3
"""Tokenize text into Megatron `.bin/.idx` datasets, with Megatron-LM's tools/preprocess_data.py flags.

  python tools/preprocess_data.py --input data/*.jsonl.gz --output-prefix out/corpus \\
      --tokenizer-model tok.model --append-eod --workers 8 [--patch-size 4]
  mpirun -np 16 python tools/preprocess_data.py ...   (or srun: every rank takes a share of the input)

The command line of megatron_patch.cli.preprocess (see --help); the work is megatron_patch.data.preprocess.
"""

from megatron_patch.cli.preprocess import main

if __name__ == "__main__":
    main()
