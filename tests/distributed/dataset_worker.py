"""Run by torchrun (or alone) from test_data_parallel.py: every rank builds the training set of the given flags
(with a shared cache directory, megatron-core builds its index files on rank 0 first and the other ranks read
them) and writes the sha256 of all its samples to OUT_DIR/rank{R}.txt.

  dataset_worker.py OUT_DIR <pretrain_patch_gpt flags>
"""

import hashlib
import os
import sys

import numpy
import torch.distributed as dist

from megatron_patch.config.flags import parse_args
from megatron_patch.distributed import parallel
from megatron_patch.training.trainer import Trainer

out, argv = sys.argv[1], sys.argv[2:]
cfg = parse_args(argv).resolve(parallel.launch_from_env().world_size)
parallel.initialize(cfg.parallel, cfg.seed)
train, _ = Trainer(cfg).build_datasets()
digest = hashlib.sha256()
for i in range(len(train)):
    for key, value in sorted(train[i].items()):  # a blend adds the dataset id of each sample
        digest.update(key.encode() + numpy.asarray(value).tobytes())
with open(os.path.join(out, f"rank{dist.get_rank()}.txt"), "w") as f:
    f.write(f"{len(train)} {digest.hexdigest()}")
parallel.destroy()
