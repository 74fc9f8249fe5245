#!/usr/bin/env python3
"""Concatenate datasets written by tools/preprocess_data.py into one, in the order given.

  python tools/merge_datasets.py --input out/a_text_document out/b_text_document --output-prefix out/ab_text_document
  python tools/merge_datasets.py --input out/parts/ --output-prefix out/all_text_document

The command line of megatron_patch.cli.merge (see --help); the work is megatron_patch.data.merge.
"""

from megatron_patch.cli.merge import main

if __name__ == "__main__":
    main()
