#!/usr/bin/env python3
"""Train a SentencePiece tokenizer on JSONL or plain-text files.

  python tools/train_tokenizer.py --input corpus.jsonl --model-prefix tok --vocab-size 8000

The command line of megatron_patch.cli.train_tokenizer (see --help); the work is
megatron_patch.data.tokenizers.training.
"""

from megatron_patch.cli.train_tokenizer import main

if __name__ == "__main__":
    main()
