"""pretrain_patch_gpt.py / megatron-patch-train: one phase, or with --patch-fraction a two-phase plan (both phases,
or the one --phase names). Every setting is checked before any process group starts; mistakes are one line on
stderr (exit 2), a diverged run exits 1.

  torchrun --nproc-per-node 8 pretrain_patch_gpt.py --model-preset paper-370m --patch-size 4 ...
"""

from __future__ import annotations

import sys

from megatron_patch.checkpoint import layout
from megatron_patch.checkpoint.storage import CheckpointSaveError
from megatron_patch.config.flags import parse_args
from megatron_patch.config.plan import phases_to_run
from megatron_patch.config.schema import ConfigError
from megatron_patch.data.dataset import DataError
from megatron_patch.distributed import parallel
from megatron_patch.distributed.parallel import print_rank_0
from megatron_patch.training.deepspeed import DeepSpeedTrainer
from megatron_patch.training.trainer import Trainer, TrainingDiverged, pretrain


def _fail(error: Exception, code: int, say: bool = True):
    if say:
        print(f"pretrain_patch_gpt: error: {error}", file=sys.stderr)
    sys.exit(code)


def main(argv=None) -> None:
    try:
        cfg = parse_args(argv)
        phases, plan = phases_to_run(cfg, parallel.launch_from_env().world_size)
        parallel.initialize(phases[0].parallel, cfg.seed)
    except ConfigError as e:
        _fail(e, 2)
    try:
        if plan:
            print_rank_0(plan.describe())
        for phase in phases:
            if plan and layout.latest_iteration(phase.save) == phase.train_iters:
                print_rank_0(f"{phase.save}: already complete at iteration {phase.train_iters}, skipped")
                continue
            pretrain(phase, DeepSpeedTrainer if phase.deepspeed.enabled else Trainer)
    except (ConfigError, DataError) as e:
        _fail(e, 2)
    except TrainingDiverged as e:
        _fail(e, 1)
    except CheckpointSaveError as e:  # disk full, unwritable --save: every rank has the message, rank 0 says it
        _fail(e, 1, say=parallel.is_rank_0())
    finally:
        parallel.destroy()


if __name__ == "__main__":
    main()
