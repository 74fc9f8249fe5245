"""tools/plot_runs.py / megatron-patch-plot-runs: compare runs from their training logs, in a figure and a table.

  python tools/plot_runs.py baseline=runs/base/log.jsonl two-phase=runs/plan --output cmp.png \\
      [--table cmp.md] [--json cmp.json] [--eval baseline=base_eval.json --eval two-phase=plan_eval.json]

RUN is [NAME=]PATH: a --log-json file, a directory or log prefix holding a plan's log.phase1.jsonl and
log.phase2.jsonl (joined in order) or log.jsonl, or a --tensorboard-dir directory. The table (printed in Markdown;
--table, --json write it) gives each run's final token-level validation loss and perplexity, tokens, model FLOPs,
FLOPs relative to the run named `baseline` (else the first), wall time and K per phase, all as the logs hold them
(megatron_patch/experiments/runs.py); --eval NAME=FILE adds the token-level scores of an `evaluate.py --output` JSON.

The figure (--output, PNG): token-level validation loss (every phase's model read at K=1: comparable across
phases and runs) against cumulative model FLOPs and tokens, and the train loss likewise. The train loss is each
phase's objective: in a K>1 phase (dashed) it is the mean loss of the K targets, which is NOT comparable with a
token-level loss; only the K=1 parts (solid) compare across runs. A dotted vertical line in a run's colour marks
where its phase 1 ended; a dash-dotted line in a K>1 phase is the unigram entropy of its data (the loss of a
predictor that ignores the context: phase 1 near it has learned only token frequencies). Needs matplotlib (the
table does not).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List

from megatron_patch.errors import OneLineErrorParser, fail, one_line_errors
from megatron_patch.experiments.runs import Run, RunError, markdown, phases_label, read_runs, table, to_json

PROG = "plot_runs.py"
PANELS = ("valid_vs_flops", "valid_vs_tokens", "train_vs_flops", "train_vs_tokens")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="[NAME=]PATH: a log file, a plan's directory or log "
                                                               "prefix, or a TensorBoard directory")
    parser.add_argument("--output", metavar="PNG", help="write the figure here")
    parser.add_argument("--table", metavar="MD", help="also write the Markdown table here")
    parser.add_argument("--json", metavar="FILE", help="write the table as JSON here (with the points plotted)")
    parser.add_argument("--eval", action="append", default=[], metavar="NAME=FILE",
                        help="attach an evaluate.py --output JSON to the run NAME (repeatable)")
    parser.add_argument("--title", help="the figure's title (default: the runs' names)")
    return parser


def plot(runs: List[Run], output: str, title: str = None) -> Dict[str, dict]:
    """Draw the 2x2 figure into `output`; returns per run the number of points each panel drew (and of unigram
    entropy lines)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError as e:
        raise RunError(f"--output needs matplotlib ({e}); pip install matplotlib, or drop --output") from None

    fig, axes = plt.subplots(2, 2, figsize=(13, 9), constrained_layout=True)
    panels = dict(zip(PANELS, axes.flat))
    drawn = {run.name: dict.fromkeys((*PANELS, "unigram_lines"), 0) for run in runs}
    for index, run in enumerate(runs):
        colour = f"C{index % 10}"
        label = f"{run.name} ({phases_label(run.patch_sizes)})"
        tokens, flops, loss = zip(*run.valid_points()) if run.valid_points() else ((), (), ())
        for panel, x in (("valid_vs_flops", flops), ("valid_vs_tokens", tokens)):
            panels[panel].plot(x, loss, color=colour, marker="o", markersize=3.5, linewidth=1.5, label=label)
            drawn[run.name][panel] += len(x)
        for number, points in enumerate(run.train_points()):
            k = run.phases[number].patch_size
            tokens, flops, loss = zip(*points)
            style = dict(color=colour, linewidth=1.0, linestyle="--" if k > 1 else "-", alpha=0.75 if k > 1 else 1.0)
            for panel, x in (("train_vs_flops", flops), ("train_vs_tokens", tokens)):
                panels[panel].plot(x, loss, **style)
                drawn[run.name][panel] += len(x)
                bound = (run.phases[number].summary or {}).get("unigram_entropy")
                if bound is not None:  # the plateau gauge: where a context-free predictor ends
                    panels[panel].hlines(bound, min(x), max(x), color=colour, linestyle="-.", linewidth=1.2)
                    drawn[run.name]["unigram_lines"] += 1
        for boundary_tokens, boundary_flops in run.boundaries():
            for panel, ax in panels.items():
                ax.axvline(boundary_flops if panel.endswith("flops") else boundary_tokens, color=colour,
                           linestyle=":", linewidth=1.5)

    def runs_handles(marker):
        return [Line2D([], [], color=f"C{index % 10}", marker=marker, markersize=3.5,
                       label=f"{run.name} ({phases_label(run.patch_sizes)})") for index, run in enumerate(runs)]

    boundary = Line2D([], [], color="grey", linestyle=":", linewidth=1.5, label="end of phase 1 (run's colour)")
    patch_level = Line2D([], [], color="grey", linestyle="--", linewidth=1.0,
                         label="K>1 phase: mean K-target loss (not token-level)")
    token_level = Line2D([], [], color="grey", linestyle="-", linewidth=1.0, label="K=1 phase: token loss")
    unigram = Line2D([], [], color="grey", linestyle="-.", linewidth=1.2,
                     label="K>1 phase: unigram entropy of its data (a context-free predictor's loss)")
    has_unigram = any((p.summary or {}).get("unigram_entropy") is not None for run in runs for p in run.phases)
    for panel, ax in panels.items():
        valid = panel.startswith("valid")
        ax.set_title("token-level validation loss (model read at K=1)" if valid else
                     "train loss (each phase's objective)")
        ax.set_ylabel("validation loss at K=1 (nats/token)" if valid else "train loss (nats/target)")
        ax.set_xlabel("model FLOPs, cumulative from the run's start" if panel.endswith("flops") else
                      "tokens, cumulative from the run's start")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0), useMathText=True)
        ax.grid(True, alpha=0.3)
        handles = runs_handles("o") if valid else runs_handles(None) + [token_level, patch_level] + (
            [unigram] if has_unigram else [])
        ax.legend(handles=handles + ([boundary] if any(run.boundaries() for run in runs) else []), fontsize=8)
    _zoom_train_panels(runs, [panels["train_vs_flops"], panels["train_vs_tokens"]])
    fig.suptitle(title or "runs: " + ", ".join(run.name for run in runs))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return drawn


def _zoom_train_panels(runs: List[Run], axes) -> None:
    """Train losses start at ~ln(vocabulary) and fall fast: show from the lowest loss up to the highest loss after
    the first tenth of each run's steps, so the part where runs differ fills the panel."""
    losses, later = [], []
    for run in runs:
        series = [loss for points in run.train_points() for _, _, loss in points]
        bounds = [p.summary["unigram_entropy"] for p in run.phases if (p.summary or {}).get("unigram_entropy")]
        losses += series + bounds
        later += series[len(series) // 10:] + bounds
    if not losses or not later:
        return
    low, high = min(losses), max(later)
    margin = 0.05 * (high - low or 1.0)
    for ax in axes:
        ax.set_ylim(low - margin, high + margin)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    with one_line_errors(PROG):
        runs = read_runs(args.runs, args.eval)
        rows = table(runs)
        drawn = plot(runs, args.output, args.title) if args.output else {}
    text = markdown(rows)
    print(text)
    extra = {name: {"points_plotted": points} for name, points in drawn.items()}
    try:
        if args.table:
            with open(args.table, "w") as f:
                f.write(text + "\n")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(to_json(rows, extra), f, indent=2)
                f.write("\n")
    except OSError as e:
        fail(PROG, e)
    if args.output:
        print(f"figure: {args.output}")


if __name__ == "__main__":
    main()
