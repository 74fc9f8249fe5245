"""tools/sweep.py / megatron-patch-sweep: a grid of runs (sizes x K x lambda x tokens x seeds), one after another on
this machine or submitted to Slurm, each evaluated at token level, compared in one table and plots.

  python tools/sweep.py grid.yaml [--out DIR]        # train and evaluate what is not finished, then the results
  python tools/sweep.py grid.yaml --dry-run          # the runs and their commands, nothing started
  python tools/sweep.py grid.yaml --slurm [--dry-run]  # queue each two-phase point via slurm/submit_two_phase.sh
  python tools/sweep.py grid.yaml --collect          # evaluate trained runs (e.g. after Slurm), then the results

The grid file's format: megatron_patch/experiments/sweep.py (and README.md, "Sweeps"). Each run lives in OUT/runs/NAME/
(NAME = size=S_K=K_lambda=L_tokens=D_seed=N): checkpoints, train.jsonl logs, train.out, eval.json, eval.out. A run
is finished when its final checkpoint holds the planned iteration and eval.json scores it; finished runs are
skipped, unfinished ones resume. Results: OUT/results.csv, results.md, results.json, loss_vs_compute.png (every
run's token-level validation loss against model FLOPs, tools/plot_runs.py's figure), ppl_vs_K.png, ppl_vs_lambda.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

from megatron_patch.cli.plot_runs import plot
from megatron_patch.errors import OneLineErrorParser, fail, one_line_errors
from megatron_patch.experiments.runs import Run, RunError
from megatron_patch.experiments.sweep import (
    Grid,
    Point,
    read_grid,
    read_point,
    rows,
    series,
    shell_line,
    slurm_submission,
    to_csv,
    to_markdown,
)

PROG = "sweep.py"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", help="the grid file (.yaml/.yml or .json)")
    parser.add_argument("--out", help="output directory (default: the grid's 'out')")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and their commands; start nothing")
    parser.add_argument("--slurm", action="store_true",
                        help="submit each unfinished two-phase point through slurm/submit_two_phase.sh")
    parser.add_argument("--collect", action="store_true",
                        help="train nothing: evaluate the trained runs, then write the results")
    return parser


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [""])[-1]


def _run(command: List[str], output: str) -> int:
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "a") as f:
        f.write(f"$ {' '.join(command)}\n")
        f.flush()
        return subprocess.run(command, stdout=f, stderr=subprocess.STDOUT).returncode


def _step(command: List[str], output: str, what: str) -> bool:
    """Run one step of a point, saying how it went on the progress line."""
    print(f" {what} ...", end="", flush=True)
    start = time.monotonic()
    code = _run(command, output)
    if code != 0:
        print(f" failed (exit {code}): {_last_line(output)} (log: {output})", flush=True)
        return False
    print(f" done in {time.monotonic() - start:.0f} s", end="", flush=True)
    return True


def _ppl(point: Point) -> str:
    result = point.evaluation()
    return f"ppl {result['token_level']['perplexity']:.2f}" if result else "not evaluated"


def run_points(grid: Grid, collect: bool) -> int:
    """Train (unless `collect`) and evaluate every unfinished point, one after another; returns the failures."""
    failures = 0
    for index, point in enumerate(grid.points, 1):
        print(f"[{index}/{len(grid.points)}] {point.name} ({point.kind}):", end="", flush=True)
        if point.finished():
            print(f" finished, skipped ({_ppl(point)})", flush=True)
            continue
        if not point.trained():
            if collect:
                print(f" not trained ({point.final_checkpoint} does not hold iteration {point.final_iteration}), "
                      f"left out", flush=True)
                continue
            if not _step(point.train_command, os.path.join(point.directory, "train.out"), "training"):
                failures += 1
                continue
            print(";", end="")
        if not _step(point.eval_command, os.path.join(point.directory, "eval.out"), "evaluating"):
            failures += 1
            continue
        print(f", {_ppl(point)}", flush=True)
    return failures


def submit(grid: Grid, dry_run: bool) -> int:
    failures = 0
    for index, point in enumerate(grid.points, 1):
        prefix = f"[{index}/{len(grid.points)}] {point.name}"
        if point.kind != "two-phase":
            print(f"{prefix}: {point.kind} (lambda={point.fraction:g}): not submitted (slurm/ runs two-phase plans); "
                  f"run it without --slurm")
            continue
        if point.trained():
            print(f"{prefix}: trained, skipped")
            continue
        settings, command = slurm_submission(grid, point)
        print(f"{prefix}: {shell_line(settings, command)}", flush=True)
        if dry_run:
            continue
        os.makedirs(point.directory, exist_ok=True)
        result = subprocess.run(command, env=dict(os.environ, **settings), capture_output=True, text=True)
        lines = [line for line in result.stdout.splitlines() if line.startswith(("phase ", "preprocess"))]
        if result.returncode != 0:
            failures += 1
            print(f"{prefix}: submission failed (exit {result.returncode}): "
                  f"{(result.stderr.strip().splitlines() or [''])[-1]}")
        else:
            print(f"{prefix}: " + "; ".join(line for line in lines if ": job " in line))
    if not dry_run:
        print(f"when the jobs are done: python tools/sweep.py {grid.path} --out {grid.out} --collect")
    return failures


def _plot_ppl(table: List[dict], x: str, fixed: tuple, output: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    lines = series(table, x, fixed)
    if not lines:
        return False
    fig, ax = plt.subplots(figsize=(7, 5), constrained_layout=True)
    for index, (key, points) in enumerate(lines.items()):
        label = ", ".join(f"{f}={v:.4g}" if isinstance(v, float) else f"{f}={v}" for f, v in zip(fixed, key)
                          if v != "")
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", color=f"C{index % 10}", label=label)
    if x == "K":  # each size and budget's token-only baseline
        baselines: Dict[tuple, List[float]] = {}
        for r in table:
            if r["lambda"] == 0 and r["ppl"] is not None:
                baselines.setdefault((r["size"], r["tokens"]), []).append(r["ppl"])
        for (size, tokens), ppls in sorted(baselines.items()):
            ax.axhline(sum(ppls) / len(ppls), color="grey", linestyle=":", label=f"baseline size={size}, "
                                                                                  f"tokens={tokens}")
        ax.set_xscale("log", base=2)
    ax.set_xlabel("K (tokens per patch)" if x == "K" else "lambda (fraction of the tokens at patch level)")
    ax.set_ylabel("held-out perplexity at token level (mean over seeds)")
    ax.set_title(f"final perplexity vs {x}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return True


def results(grid: Grid) -> Dict[str, str]:
    """Table and plots of every finished point; returns what was written."""
    runs: Dict[str, Run] = {p.name: read_point(p) for p in grid.points if p.finished()}
    table = rows(grid.points, runs)
    written = {}
    os.makedirs(grid.out, exist_ok=True)
    outputs = {name: os.path.join(grid.out, name) for name in ("results.csv", "results.md", "results.json")}
    with open(outputs["results.csv"], "w") as f:
        f.write(to_csv(table))
    markdown = to_markdown(table)
    with open(outputs["results.md"], "w") as f:
        f.write(markdown + "\n")
    with open(outputs["results.json"], "w") as f:
        json.dump({"grid": os.path.abspath(grid.path), "runs": table}, f, indent=2)
        f.write("\n")
    written.update(outputs)
    print(markdown)
    if runs:
        figure = os.path.join(grid.out, "loss_vs_compute.png")
        try:
            plot(list(runs.values()), figure, f"sweep {os.path.basename(grid.path)}: token-level validation loss")
            written["loss_vs_compute.png"] = figure
        except RunError as e:
            print(f"no loss_vs_compute.png: {e}")
    for x, fixed in (("K", ("size", "variant", "lambda", "tokens")), ("lambda", ("size", "variant", "K", "tokens"))):
        figure = os.path.join(grid.out, f"ppl_vs_{x}.png")
        if _plot_ppl(table, x, fixed, figure):
            written[f"ppl_vs_{x}.png"] = figure
    print("results: " + " ".join(written.values()))
    return written


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    with one_line_errors(PROG):
        grid = read_grid(args.grid, args.out)
        kinds = [p.kind for p in grid.points]
        print(f"{args.grid}: {len(grid.points)} runs "
              f"({', '.join(f'{kinds.count(k)} {k}' for k in sorted(set(kinds)))}) in {grid.out}", flush=True)
        try:
            if args.slurm:
                sys.exit(1 if submit(grid, args.dry_run) else 0)
            if args.dry_run:
                for index, point in enumerate(grid.points, 1):
                    print(f"[{index}/{len(grid.points)}] {point.name}\n  train: {' '.join(point.train_command)}\n"
                          f"  eval:  {' '.join(point.eval_command)}")
                return
            failures = run_points(grid, args.collect)
            results(grid)
        except OSError as e:
            fail(PROG, e)
    if failures:
        print(f"{failures} run(s) failed: see their train.out / eval.out", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
