"""pretrain_patch_gpt.py / megatron-patch-train: one phase, or with --patch-fraction a two-phase plan (both phases,
or the one --phase names). Every setting is checked before any process group starts; mistakes are one line on
stderr (exit 2), a diverged run exits 1.

  torchrun --nproc-per-node 8 pretrain_patch_gpt.py --model-preset paper-370m --patch-size 4 ...
"""

from __future__ import annotations

from megatron_patch.checkpoint import layout
from megatron_patch.config.flags import parse_args
from megatron_patch.config.plan import phases_to_run
from megatron_patch.distributed import parallel
from megatron_patch.distributed.parallel import print_rank_0
from megatron_patch.errors import one_line_errors
from megatron_patch.training.deepspeed_engine import DeepSpeedEngine
from megatron_patch.training.engine import MegatronEngine
from megatron_patch.training.loop import pretrain

PROG = "pretrain_patch_gpt"


def main(argv=None) -> None:
    rank_0 = True  # until the process group starts, every process says its error
    # A collective error (a failed save: every rank has the message) only rank 0 says.
    with one_line_errors(PROG, say=lambda error: rank_0 or not error.collective):
        cfg = parse_args(argv)
        phases, plan = phases_to_run(cfg, parallel.launch_from_env().world_size)
        parallel.initialize(phases[0].parallel, cfg.seed)
        rank_0 = parallel.is_rank_0()  # asked now: after parallel.destroy() every process is rank 0
        _run(phases, plan)


def _run(phases, plan) -> None:
    try:
        for notice in dict.fromkeys(phases[0].notices):
            print_rank_0(f"notice: {notice}")
        if plan:
            print_rank_0(plan.describe())
        for phase in phases:
            if plan and layout.latest_iteration(phase.save) == phase.train_iters:
                print_rank_0(f"{phase.save}: already complete at iteration {phase.train_iters}, skipped")
                continue
            summary = pretrain(phase, DeepSpeedEngine if phase.deepspeed.enabled else MegatronEngine)
            if summary["iteration"] < phase.train_iters:
                # An early exit (signal, --exit-interval, --exit-duration-in-mins) ends the command: the next
                # phase must start from this phase's final weights, which the rerun will produce.
                if phase is not phases[-1]:
                    print_rank_0(f"{phase.save}: stopped at iteration {summary['iteration']} of "
                                 f"{phase.train_iters}; the next phase waits: rerun the same command to resume")
                break
    finally:
        parallel.destroy()


if __name__ == "__main__":
    main()
