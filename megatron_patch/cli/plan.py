"""tools/plan.py / megatron-patch-plan: print the two-phase plan a training command would run, without running it.
Imports no torch, so it runs on a login node (slurm/phase.sbatch --check uses it).

  python tools/plan.py --patch-size 4 --patch-fraction 0.667 --seq-length 2048 --global-batch-size 1024 \\
      --train-tokens 100000000000 --recipe paper --save ckpt [--json]

Takes the flags of pretrain_patch_gpt.py (model and data flags are accepted and ignored): --seq-length and
--global-batch-size describe the token-level phase 2; phase 1 reads K times longer samples, K times fewer per
step, so both phases see the same tokens per step. Add --patch-fraction to pretrain_patch_gpt.py's command to run
the plan (both phases, or one with --phase 1 / --phase 2 for job chaining).
"""

from __future__ import annotations

import json
import sys

from megatron_patch.config.flags import PLAN_REQUIRED, parse_args
from megatron_patch.config.plan import make_plan
from megatron_patch.errors import one_line_errors


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["-h"], ["--help"]):
        print(__doc__)
        return
    as_json = "--json" in argv
    if as_json:
        argv.remove("--json")
    with one_line_errors("plan"):
        plan = make_plan(parse_args(argv, prog="plan.py", required=PLAN_REQUIRED))
    print(json.dumps(plan.to_dict(), indent=2) if as_json else plan.describe())


if __name__ == "__main__":
    main()
