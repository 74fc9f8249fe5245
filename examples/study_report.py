#!/usr/bin/env python3
"""RESULTS.md's tables and figure from the study's sweeps (examples/study.sh): reads each grid's results.json under
--runs and prints Markdown; draws held-out perplexity against model FLOPs for every size (token-only runs joined by
a line, two-phase runs by another), so "same compute" is a vertical line and "same tokens" a pair of points.

  python examples/study_report.py --runs runs/study --figure docs/study_ppl_vs_flops.png > /tmp/tables.md
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
from fractions import Fraction


def load(runs_dir: str, grid: str) -> list:
    path = os.path.join(runs_dir, grid, "results.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)["runs"]


def lam(value: float) -> str:
    return str(Fraction(value).limit_denominator(8))


def find(rows, **where):
    found = [r for r in rows if all(r[k] == v for k, v in where.items())]
    return found[0] if found else None


def ppl(row) -> str:
    return "n/a" if row is None else f"{row['ppl']:.1f}"


def size_key(size: str) -> int:
    """h64 < h96 < h128."""
    return int("".join(c for c in size if c.isdigit()) or 0)


def cost(row) -> str:
    """FLOPs over the token-only run of the same size and tokens (lambda/K + 1 - lambda)."""
    return "n/a" if row["flops_vs_baseline"] is None else f"{row['flops_vs_baseline']:.2f}x"


def ratio(row, base) -> str:
    return "n/a" if base is None else f"{row['ppl'] / base['ppl']:.2f}x"


def token_only_curve(rows, size: str) -> list:
    """(tokens, PPL) of the size's token-only runs (no variant), by tokens."""
    return sorted((r["tokens"], r["ppl"]) for r in rows if r["size"] == size and r["lambda"] == 0 and not r["variant"])


def equivalent_tokens(rows, row):
    """The tokens a token-only run of the row's size would need for the row's PPL: log-log interpolation between
    the size's token-only runs; None outside their range."""
    curve = token_only_curve(rows, row["size"])
    for (t0, p0), (t1, p1) in zip(curve, curve[1:]):
        if min(p0, p1) <= row["ppl"] <= max(p0, p1):
            where = math.log(row["ppl"] / p0) / math.log(p1 / p0)
            return t0 * (t1 / t0) ** where
    return None


def ppl_at_tokens(rows, size: str, tokens: float):
    """The token-only PPL of `size` at `tokens`: log-log interpolation between its runs; None outside them."""
    curve = token_only_curve(rows, size)
    for (t0, p0), (t1, p1) in zip(curve, curve[1:]):
        if t0 <= tokens <= t1:
            return p0 * (p1 / p0) ** (math.log(tokens / t0) / math.log(t1 / t0))
    return None


def fill_costs(rows, curve) -> list:
    """Rows of a grid without token-only runs get their FLOPs over those of `curve`'s runs of the same size
    (per trained token)."""
    for r in rows:
        if r["flops_vs_baseline"] is None:
            base = next((b for b in curve if b["size"] == r["size"] and b["lambda"] == 0 and not b["variant"]), None)
            if base:
                r["flops_vs_baseline"] = (r["flops"] / r["trained_tokens"]) / (base["flops"] / base["trained_tokens"])
    return rows


def plans_table(rows, curve) -> str:
    """Each plan against token-only training of the same tokens and of the same FLOPs (interpolated)."""
    lines = ["| K | lambda | tokens | cost | PPL | token-only, same tokens | token-only, same FLOPs (interpolated) | "
             "token-only FLOPs for that PPL / plan FLOPs |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["tokens"], r["K"], r["lambda"])):
        same_tokens = ppl_at_tokens(curve, r["size"], r["tokens"])
        same_flops = ppl_at_tokens(curve, r["size"], r["tokens"] * r["flops_vs_baseline"])
        lines.append(f"| {r['K']} | {lam(r['lambda'])} | {r['tokens'] / 1e6:g}M | {cost(r)} | {r['ppl']:.1f} | "
                     + " | ".join("n/a" if v is None else f"{v:.1f}" for v in (same_tokens, same_flops))
                     + f" | {exchange(curve, r)[1]} |")
    return "\n".join(lines)


def exchange(rows, row) -> str:
    """Token-only tokens for the same PPL, and their FLOPs over the row's (> 1: the row's plan saved compute)."""
    tokens, spent = equivalent_tokens(rows, row), row["tokens"] * row["flops_vs_baseline"]
    if tokens is not None:
        return f"{tokens / 1e6:.2f}M", f"{tokens / spent:.2f}x"
    curve = token_only_curve(rows, row["size"])
    if curve and row["ppl"] > curve[0][1]:  # worse than the smallest token-only run
        return f"< {curve[0][0] / 1e6:g}M", f"< {curve[0][0] / spent:.2f}x"
    if curve and row["ppl"] < curve[-1][1]:
        return f"> {curve[-1][0] / 1e6:g}M", f"> {curve[-1][0] / spent:.2f}x"
    return "n/a", "n/a"


def budgets_table(rows) -> str:
    """Per size and budget B: token-only at B, two-phase at B, token-only at B/2 (the two-phase run's compute), and
    the token-only budget that reaches the two-phase run's PPL with the compute it saves or costs."""
    lines = ["| size | tokens B | token-only, B | two-phase K=4 lambda=2/3, B | token-only, B/2 (same compute) | "
             "two-phase vs same tokens | two-phase vs same compute | token-only tokens for the two-phase PPL | "
             "token-only FLOPs for that PPL / two-phase FLOPs |", "|---|---|---|---|---|---|---|---|---|"]
    plans = sorted((r for r in rows if r["lambda"] > 0 and not r["variant"]),
                   key=lambda r: (size_key(r["size"]), r["tokens"]))
    for plan in plans:
        same_tokens = find(rows, size=plan["size"], tokens=plan["tokens"], **{"lambda": 0.0})
        same_compute = find(rows, size=plan["size"], tokens=plan["tokens"] // 2, **{"lambda": 0.0})
        lines.append(f"| {plan['size']} | {plan['tokens'] / 1e6:g}M | {ppl(same_tokens)} | {ppl(plan)} | "
                     f"{ppl(same_compute)} | {ratio(plan, same_tokens)} | {ratio(plan, same_compute)} | "
                     + " | ".join(exchange(rows, plan)) + " |")
    return "\n".join(lines)


def k_lambda_table(rows, curve) -> str:
    """PPL for K (rows) x lambda (columns), the cost lambda/K + 1 - lambda beside each, and the token-only FLOPs
    for that PPL over the run's (from the token-only runs in `curve`)."""
    fractions = sorted({r["lambda"] for r in rows if r["lambda"] > 0})
    base = find(rows, **{"lambda": 0.0})
    lines = ["| K \\ lambda | " + " | ".join(lam(f) for f in fractions) + " |", "|---|" + "---|" * len(fractions)]
    for k in sorted({r["K"] for r in rows if r["lambda"] > 0}):
        cells = []
        for f in fractions:
            row = find(rows, K=k, **{"lambda": f})
            cells.append("n/a" if row is None else
                         f"{row['ppl']:.1f} (cost {cost(row)}, efficiency {exchange(curve, row)[1]})")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    if base:
        lines.append(f"\ntoken-only baseline (lambda = 0, cost 1.00x): {base['ppl']:.1f}")
    return "\n".join(lines)


def variant_flags(runs_dir: str, grid: str) -> dict:
    """variant name -> its flags as written in the grid file results.json names."""
    import yaml

    with open(os.path.join(runs_dir, grid, "results.json")) as f:
        path = json.load(f)["grid"]
    with open(path) as f:
        variants = yaml.safe_load(f).get("variants") or {}
    return {name: ", ".join(f"--{k}" if v is True else f"--{k} {v}" for k, v in (flags or {}).items())
            or "the grid's flags"
            for name, flags in variants.items()}


def variants_table(rows, flags: dict) -> str:
    lines = ["| run | variant | its flags | PPL | bits/byte | FLOPs vs baseline |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["lambda"], r["ppl"])):
        kind = ("token-only" if r["lambda"] == 0 else f"patch-only K={r['K']}" if r["lambda"] == 1
                else f"two-phase K={r['K']}, lambda={lam(r['lambda'])}")
        own = flags.get(r["variant"], "the grid's flags")
        lines.append(f"| {kind} | {r['variant'] or '(shared)'} | {own} | "
                     f"{r['ppl']:.1f} | {r['bits_per_byte']:.3f} | {cost(r)} |")
    return "\n".join(lines)


def unigram_perplexity(runs_dir: str) -> float:
    """Held-out perplexity of the training split's token frequencies (add-one smoothed): what a model that ignores
    the context scores. Tokenized as tools/evaluate.py reads a document (its tokens, then EOD)."""
    import numpy
    import sentencepiece

    with open(os.path.join(runs_dir, "docs_text_document.meta.json")) as f:
        meta = json.load(f)
    tokens = numpy.fromfile(os.path.join(runs_dir, "docs_text_document.bin"), dtype=meta["dtype"])
    counts = numpy.bincount(tokens[tokens != meta["pad_id"]], minlength=meta["vocab_size"]) + 1.0
    log_p = numpy.log(counts / counts.sum())
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(runs_dir, "tokenizer.model"))
    nll, n = 0.0, 0
    with open(os.path.join(runs_dir, "heldout.jsonl")) as f:
        for line in f:
            ids = sp.encode(json.loads(line)["text"]) + [meta["eod_id"]]
            nll, n = nll - log_p[ids].sum(), n + len(ids)
    return math.exp(nll / n)


def patch_loss_windows(runs_dir: str, grid: str, starts=(1, 100, 200, 300, 600, 1100), width=72) -> str:
    """Mean patch-level training loss of a patch-only grid's run over windows of steps (its train.jsonl)."""
    from megatron_patch.training import json_log

    lines = []
    for path in sorted(glob.glob(os.path.join(runs_dir, grid, "runs", "*", "train.jsonl"))):
        losses = {i: r["loss"] for i, r in json_log.steps(path).items()}
        means = [f"steps {a}-{a + width - 1}: {sum(v) / len(v):.2f}" for a in starts
                 if (v := [loss for i, loss in losses.items() if a <= i < a + width])]
        lines.append(f"{os.path.basename(os.path.dirname(path))}: mean patch-level loss, " + "; ".join(means))
    return "\n".join(lines)


def plateau_table(runs_dir: str, grid: str, flags: dict, at=(40, 80, 160), tail=40) -> str:
    """Per variant of a patch-only grid: its patch-level validation loss at steps `at`, its mean training loss over
    the last `tail` steps, and both against the unigram entropy its run logged (the plateau gauge)."""
    from megatron_patch.training import json_log

    head = " | ".join(f"valid loss @ {step}" for step in at)
    lines = [f"| variant | its flags | {head} | train loss, last {tail} steps | train loss - unigram entropy | "
             f"held-out PPL |", "|---" * (len(at) + 5) + "|"]
    for r in sorted(load(runs_dir, grid), key=lambda r: r["ppl"]):
        path = os.path.join(runs_dir, grid, "runs", r["run"], "train.jsonl")
        evals = [record["eval"] for record in json_log.read_records(path) if "eval" in record]
        valid = {e["iteration"]: e["valid_loss"] for e in evals}
        losses = [step["loss"] for step in json_log.steps(path).values()][-tail:]
        bound = json_log.last_summary(path)["unigram_entropy"]
        train = sum(losses) / len(losses)
        cells = " | ".join(f"{valid[step]:.3f}" if step in valid else "n/a" for step in at)
        lines.append(f"| {r['variant'] or 'paper'} | {flags.get(r['variant'], 'none: the grid')} | {cells} | "
                     f"{train:.3f} | {train - bound:+.3f} | {r['ppl']:.1f} |")
    return "\n".join(lines)


def figure(rows, output: str, unigram: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), constrained_layout=True)
    series = {}
    for r in rows:
        if not r["variant"]:
            kind = "token-only" if r["lambda"] == 0 else f"two-phase K={r['K']}, lambda={lam(r['lambda'])}"
            series.setdefault((r["size"], kind), []).append((r["flops"], r["ppl"]))
    order = sorted(series, key=lambda key: (size_key(key[0]), key[1]))
    for index, key in enumerate(order):
        xs, ys = zip(*sorted(series[key]))
        ax.plot(xs, ys, "-" if key[1] == "token-only" else "--", marker="o", color=f"C{index % 10}",
                label=f"{key[0]}: {key[1]}")
    ax.axhline(unigram, color="grey", linestyle=":", label=f"unigram frequencies (no context): {unigram:.0f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model FLOPs of training (both phases)")
    ax.set_ylabel("held-out perplexity, token level")
    ax.set_title("State of the Union corpus: token-only vs two-phase plans (dashed)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(output, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/study", help="examples/study.sh's output directory")
    parser.add_argument("--figure", help="write the PPL-vs-FLOPs figure here")
    args = parser.parse_args()
    budgets, ladder = load(args.runs, "budgets"), load(args.runs, "ladder")
    print("## Budgets (h96)\n\n" + budgets_table(budgets))
    print("\n## Sizes\n\n" + budgets_table(ladder + budgets))
    print("\n## K x lambda (h96, 1.2M tokens)\n\n" + k_lambda_table(load(args.runs, "k_lambda"), budgets))
    small = fill_costs(load(args.runs, "small_lambda"), budgets)
    if small:
        print("\n## Short phase 1: K=8, small lambda (h96)\n\n" + plans_table(small, budgets))
    for grid, title in (("lr", "Learning rates (h96, 1.2M tokens)"), ("phase1", "Patch-only LRs (h96, 2.4M tokens)")):
        rows = fill_costs(load(args.runs, grid), budgets)
        if rows:
            print(f"\n## {title}\n\n" + variants_table(rows, variant_flags(args.runs, grid)))
    long = load(args.runs, "patch_long")
    if long:
        print("\n## Patch-only, long (h96)\n\n" + variants_table(fill_costs(long, budgets), {}) + "\n\n"
              + patch_loss_windows(args.runs, "patch_long"))
    if load(args.runs, "plateau"):
        print("\n## Leaving the plateau: patch-only K=4 variants (h96, quick start corpus, 160 steps)\n\n"
              + plateau_table(args.runs, "plateau", variant_flags(args.runs, "plateau")))
    if not os.path.exists(os.path.join(args.runs, "docs_text_document.bin")):
        return  # the plateau grid alone (it reads the quick start's data)
    unigram = unigram_perplexity(args.runs)
    print(f"\nheld-out perplexity of the training split's unigram frequencies: {unigram:.1f}")
    if args.figure:
        figure(ladder + budgets + small, args.figure, unigram)
        print(f"\nfigure: {args.figure}")


if __name__ == "__main__":
    main()
