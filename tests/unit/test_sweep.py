"""tools/sweep.py: a 2-point grid of tiny runs (a token-only baseline and a two-phase K=4, lambda=0.5 plan, 4 steps
each) trained and evaluated on held-out documents, a table whose rows are the runs' logs and eval JSON, a rerun that
skips both, Slurm submission through slurm/submit_two_phase.sh (with a stand-in sbatch), and bad grids as one
line."""

import csv
import json
import os
import re

import pytest

from helpers import PYTHON, run
from megatron_patch.experiments.sweep import GridError, read_grid, slurm_submission
from megatron_patch.training import json_log

BASE = "size=tiny_K=1_lambda=0_tokens=1024_seed=3"
PLAN = "size=tiny_K=4_lambda=0.5_tokens=1024_seed=3"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _grid(corpus, out):
    """4 steps of 8 x 32 tokens per run; held-out documents the corpus fixture's datasets do not hold."""
    with open(corpus["dir"] / "full.jsonl") as f:
        held_out = f.readlines()[160:162]
    (out / "heldout.jsonl").write_text("".join(held_out))
    return {
        "out": str(out / "sweep"),
        "common": {"data-path": corpus["aligned4"], "tokenizer-model": corpus["tokenizer"],
                   "data-cache-path": str(out / "cache"), "seq-length": 32, "global-batch-size": 8,
                   "micro-batch-size": 2, "lr": 3e-3, "lr-warmup-iters": 1, "split": "90,10,0", "eval-interval": 2,
                   "eval-iters": 1, "ckpt-format": "torch"},
        "sizes": {"tiny": "tiny"},
        "K": [4],
        "lambda": [0, "1/2"],
        "tokens": [1024],
        "seeds": [3],
        "eval": {"text": str(out / "heldout.jsonl"), "seq-length": 32, "micro-batch-size": 4},
    }


def _write_yaml(path, grid):
    import yaml

    path.write_text(yaml.safe_dump(grid))
    return path


def _sweep(*args, check=True, env=None):
    return run([PYTHON, "tools/sweep.py", *map(str, args)], check=check, env=env, timeout=900)


def _files(root):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(root) for f in fs}


@pytest.fixture(scope="module")
def swept(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    grid = _write_yaml(out / "grid.yaml", _grid(corpus, out))
    first = _sweep(grid)
    runs = out / "sweep" / "runs"
    before = _files(runs)
    second = _sweep(grid)
    return {"out": out, "grid": grid, "sweep": out / "sweep", "runs": runs, "first": first.stdout,
            "second": second.stdout, "before": before, "after": _files(runs)}


def test_both_runs_trained_and_evaluated_with_progress_lines(swept):
    lines = swept["first"].splitlines()
    assert lines[0].endswith("2 runs (1 baseline, 1 two-phase) in " + str(swept["sweep"]))
    for index, (name, kind) in enumerate(((BASE, "baseline"), (PLAN, "two-phase")), 1):
        result = json.loads((swept["runs"] / name / "eval.json").read_text())
        assert result["source"] == "text" and result["inputs"] == [str(swept["out"] / "heldout.jsonl")]
        ppl = result["token_level"]["perplexity"]
        pattern = (rf"\[{index}/2\] {re.escape(name)} \({kind}\): training \.\.\. done in \d+ s; evaluating \.\.\. "
                   rf"done in \d+ s, ppl {ppl:.2f}")
        assert any(re.fullmatch(pattern, line) for line in lines), (pattern, swept["first"])
    # The plan's final checkpoint is phase 2's; the baseline's its own.
    assert json.loads((swept["runs"] / PLAN / "eval.json").read_text())["checkpoint"].endswith("phase2")
    assert (swept["runs"] / PLAN / "train.phase1.jsonl").is_file()


def test_rerun_skips_both_and_touches_nothing(swept):
    for index, name in enumerate((BASE, PLAN), 1):
        assert re.search(rf"^\[{index}/2\] {re.escape(name)} \([a-z-]+\): finished, skipped \(ppl [0-9.]+\)$",
                         swept["second"], re.M), swept["second"]
    assert "training" not in swept["second"] and "evaluating" not in swept["second"]
    assert swept["before"] == swept["after"]


def _logged(run_dir):
    """The last phase's summary and every phase's seconds, read straight from the training logs."""
    logs = [run_dir / "train.jsonl"] if (run_dir / "train.jsonl").is_file() else \
        [run_dir / "train.phase1.jsonl", run_dir / "train.phase2.jsonl"]
    summaries = [s for log in logs for s in json_log.summaries(str(log))]
    return summaries[-1], sum(s["seconds"] for s in summaries)


def test_table_rows_are_the_logs_and_evaluations(swept):
    rows = {r["run"]: r for r in json.loads((swept["sweep"] / "results.json").read_text())["runs"]}
    assert set(rows) == {BASE, PLAN}
    base_flops = _logged(swept["runs"] / BASE)[0]["cumulative_flops"]
    for name, k, fraction in ((BASE, 1, 0.0), (PLAN, 4, 0.5)):
        row, run_dir = rows[name], swept["runs"] / name
        summary, seconds = _logged(run_dir)
        scores = json.loads((run_dir / "eval.json").read_text())["token_level"]
        assert (row["size"], row["K"], row["lambda"], row["tokens"], row["seed"]) == ("tiny", k, fraction, 1024, 3)
        assert row["ppl"] == scores["perplexity"] and row["bits_per_byte"] == scores["bits_per_byte"]
        assert row["eval_loss"] == scores["loss"]
        assert row["valid_loss"] == summary["token_level_valid_loss"]
        assert row["flops"] == summary["cumulative_flops"] and row["trained_tokens"] == summary["cumulative_tokens"]
        assert row["wall_seconds"] == seconds
        assert row["flops_vs_baseline"] == summary["cumulative_flops"] / base_flops
    assert rows[PLAN]["flops_vs_baseline"] == pytest.approx(0.5 / 4 + 0.5, rel=1e-12)  # lambda/K + 1 - lambda
    # The CSV and the Markdown hold the same rows.
    with open(swept["sweep"] / "results.csv") as f:
        table = {r["run"]: r for r in csv.DictReader(f)}
    for name, row in rows.items():
        assert {key: float(table[name][key]) for key in ("ppl", "bits_per_byte", "flops", "flops_vs_baseline")} == \
            {key: row[key] for key in ("ppl", "bits_per_byte", "flops", "flops_vs_baseline")}
    markdown = (swept["sweep"] / "results.md").read_text()
    assert f"| {PLAN} | tiny | 4 | 0.5 | 1,024 | 3 | - | {rows[PLAN]['ppl']:.2f} |" in markdown
    for png in ("loss_vs_compute.png", "ppl_vs_K.png", "ppl_vs_lambda.png"):
        assert (swept["sweep"] / png).read_bytes().startswith(PNG_MAGIC)


def test_slurm_submits_the_two_phase_point_through_submit_two_phase(swept, tmp_path):
    """A stand-in sbatch records its arguments; slurm/submit_two_phase.sh checks the settings and the plan (tools/
    plan.py) for real and queues phase 1 -> phase 2 of the two-phase point; the baseline is not submitted."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/calls\necho $((100 + $(wc -l < '
                                 f'{tmp_path}/calls)))\n')
    (fake / "sbatch").chmod(0o755)
    out = tmp_path / "slurm_sweep"
    result = _sweep(swept["grid"], "--out", out, "--slurm", env={"PATH": f"{fake}:{os.environ['PATH']}"})
    assert f"{BASE}: baseline (lambda=0): not submitted" in result.stdout
    assert f"[2/2] {PLAN}: phase 1: job 101; phase 2: job 102" in result.stdout, result.stdout
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 2 and "--dependency=afterok:101" in calls[1]
    assert all(f"--output={out}/runs/{PLAN}/%x-%j.out" in call and "phase.sbatch" in call for call in calls)
    # The settings: the grid's trainer flags as phase.sbatch's variables, the rest in EXTRA_ARGS.
    grid = read_grid(str(swept["grid"]), str(out))
    settings, command = slurm_submission(grid, grid.points[1])
    assert command[0] == "bash" and command[1].endswith("slurm/submit_two_phase.sh")
    assert (settings["CKPT_DIR"], settings["PATCH_SIZE"], settings["PATCH_FRACTION"], settings["TRAIN_TOKENS"],
            settings["SEQ_LENGTH"], settings["GLOBAL_BATCH_SIZE"], settings["MODEL_ARGS"]) == \
        (str(out / "runs" / PLAN), "4", "0.5", "1024", "32", "8", "--model-preset tiny")
    assert settings["EXTRA_ARGS"].endswith("--seed 3") and "--lr 0.003" in settings["EXTRA_ARGS"]


@pytest.mark.parametrize("change, message", [
    ({"lambda": [0, 1.5]}, r"lambda: 1\.5: lambda must be in \[0, 1\]"),
    ({"K": [1]}, r"K: 1: must be >= 2"),
    ({"tokens": None}, r"missing 'tokens'"),
    ({"colour": "red"}, r"unknown key\(s\) colour"),
    ({"common": {"save": "x"}}, r"common sets --save, which the sweep sets for each run"),
    ({"lambda": [0.05]}, r"run size=tiny_K=4_lambda=0\.05_tokens=1024_seed=3: --patch-fraction 0\.05 of 4 "
                         r"iterations leaves a phase with no iterations"),
    ({"variants": {"a_b": {}}}, r"variants: 'a_b': a name is a word without '/', '_', '=' or spaces"),
    ({"variants": {"x": {"seed": 2}}}, r"variants: x sets --seed, which the sweep sets for each run"),
], ids=["lambda", "K", "missing", "unknown", "per-run-flag", "plan", "variant-name", "variant-per-run-flag"])
def test_bad_grid_is_one_line_naming_the_file(corpus, tmp_path, change, message):
    grid = _grid(corpus, tmp_path)
    grid.update(change)
    grid = {k: v for k, v in grid.items() if v is not None}
    path = _write_yaml(tmp_path / "grid.yaml", grid)
    with pytest.raises(GridError, match=f"^{re.escape(str(path))}: {message}"):
        read_grid(str(path))


def test_variants_share_the_runs_their_flags_do_not_change(corpus, tmp_path):
    """A variant that only sets a plan's phases applies to two-phase runs; the baseline is the same run for it and
    for a variant without flags (named without a variant); a variant with other flags has its own baseline."""
    grid = _grid(corpus, tmp_path)
    grid["variants"] = {"paper": {}, "p2": {"phase2-lr-warmup-iters": 0, "phase2-lr": 1e-3}, "hot": {"lr": 5e-3}}
    points = {p.name: p for p in read_grid(str(_write_yaml(tmp_path / "grid.yaml", grid))).points}
    assert sorted(points) == sorted([BASE, f"{BASE}_variant=hot", f"{PLAN}_variant=paper", f"{PLAN}_variant=p2",
                                     f"{PLAN}_variant=hot"])
    tail = lambda name: " ".join(points[name].train_command[2:])  # noqa: E731
    plan = tail(f"{PLAN}_variant=p2")
    assert "--phase2-lr-warmup-iters 0" in plan and "--phase2-lr 0.001" in plan and "--lr 0.003" in plan
    assert plan.endswith(f"--patch-size 4 --patch-fraction 0.5 --save {tmp_path}/sweep/runs/{PLAN}_variant=p2 "
                         f"--log-json {tmp_path}/sweep/runs/{PLAN}_variant=p2/train.jsonl")
    assert points[f"{PLAN}_variant=p2"].directory == f"{tmp_path}/sweep/runs/{PLAN}_variant=p2"


def test_bad_grid_file_and_flag_are_one_line_on_stderr(corpus, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("out: x\nsizes: [tiny\nK: [4]\n")
    result = _sweep(broken, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert re.fullmatch(rf"sweep\.py: error: {re.escape(str(broken))}: invalid YAML at line \d+ column \d+: .+\n",
                        result.stderr), result.stderr
    grid = _grid(corpus, tmp_path)
    grid["common"]["lr"] = "fast"
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(grid))
    result = _sweep(path, check=False)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"{path}: run size=tiny_K=1_lambda=0_tokens=1024_seed=3: error: argument --lr")
    (tmp_path / "bad.json").write_text('{"out": "x",}')
    result = _sweep(tmp_path / "bad.json", check=False)
    assert result.stderr == f"sweep.py: error: {tmp_path / 'bad.json'}: invalid JSON at line 1 column 13: " \
                            f"Expecting property name enclosed in double quotes\n"
