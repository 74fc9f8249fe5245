#!/usr/bin/env python3
"""pretrain_patch_gpt.py's main, unchanged except that one rank raises a Python exception at the start of one step:
the fault of an exception on one rank only (test_faults.py). No test-only code in the library: the step is wrapped
here, as benchmarks/logging_overhead.py wraps PhaseLog.step.

  torchrun --nproc-per-node 2 tests/distributed/raising_trainer.py RANK ITERATION TRAINER_FLAGS...
"""

import os
import sys

from megatron_patch.cli.pretrain import main
from megatron_patch.training.trainer import Trainer

rank, at = int(sys.argv[1]), int(sys.argv[2])
train_step = Trainer.train_step


def faulty_step(self, data_iterators):
    if int(os.environ.get("RANK", 0)) == rank and self.iteration + 1 == at:
        raise RuntimeError(f"injected fault: rank {rank} raises at iteration {at}")
    return train_step(self, data_iterators)


if __name__ == "__main__":
    Trainer.train_step = faulty_step
    main(sys.argv[3:])
