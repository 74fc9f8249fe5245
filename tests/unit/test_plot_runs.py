"""tools/plot_runs.py: from a real two-phase plan and a token-only baseline at the same tokens, a PNG whose panels
drew every logged point, a table whose numbers are the logs' own, TensorBoard as a source, and bad input as one
line."""

import json
import math
import shutil

import pytest

from helpers import PYTHON, plan_flags, run
from megatron_patch.experiments import runs
from megatron_patch.training import json_log

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def logged(corpus, tmp_path_factory):
    """A plan (lambda 0.75, K=4: 6 steps at K=4, 2 at K=1; also to TensorBoard) and a token-only baseline of the
    same 8 x 1024 tokens, and plot_runs' outputs for them."""
    out = tmp_path_factory.mktemp("plot_runs")
    plan, base = out / "plan", out / "base"
    run([PYTHON, "pretrain_patch_gpt.py", *plan_flags(corpus, plan, 0.75, ["--tensorboard-dir", str(out / "tb")])])
    run([PYTHON, "pretrain_patch_gpt.py", *plan_flags(corpus, base, 0)])
    result = run([PYTHON, "tools/plot_runs.py", f"two-phase={plan}", f"baseline={base / 'log.jsonl'}", "--output",
                  str(out / "plot.png"), "--table", str(out / "table.md"), "--json", str(out / "table.json")])
    rows = {row["run"]: row for row in json.loads((out / "table.json").read_text())["runs"]}
    return {"out": out, "plan": plan, "base": base, "stdout": result.stdout, "rows": rows}


def _plot_runs(*args, check=True):
    return run([PYTHON, "tools/plot_runs.py", *map(str, args)], check=check)


def test_png_panels_draw_every_logged_point(logged):
    png = (logged["out"] / "plot.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 20_000
    plan, base = logged["plan"], logged["base"]
    plan_evals = [r for p in ("phase1", "phase2") for r in json_log.read_records(str(plan / f"log.{p}.jsonl"))
                  if "eval" in r]
    base_evals = [r for r in json_log.read_records(str(base / "log.jsonl")) if "eval" in r]
    assert len(plan_evals) >= 3 and len(base_evals) >= 2
    for name, evals, unigram_lines in (("two-phase", plan_evals, 2), ("baseline", base_evals, 0)):
        # The K=4 phase's unigram entropy: one line in each train panel.
        assert logged["rows"][name]["points_plotted"] == {"valid_vs_flops": len(evals), "valid_vs_tokens": len(evals),
                                                          "train_vs_flops": 8, "train_vs_tokens": 8,
                                                          "unigram_lines": unigram_lines}


def test_table_numbers_are_the_logs_summaries(logged):
    p1 = json_log.last_summary(str(logged["plan"] / "log.phase1.jsonl"))
    p2 = json_log.last_summary(str(logged["plan"] / "log.phase2.jsonl"))
    base = json_log.last_summary(str(logged["base"] / "log.jsonl"))
    plan_row, base_row = logged["rows"]["two-phase"], logged["rows"]["baseline"]
    for row, last, seconds in ((plan_row, p2, p1["seconds"] + p2["seconds"]), (base_row, base, base["seconds"])):
        assert row["token_level_valid_loss"] == last["token_level_valid_loss"]
        assert row["token_level_valid_ppl"] == math.exp(last["token_level_valid_loss"])
        assert row["cumulative_tokens"] == last["cumulative_tokens"] == 8 * 1024
        assert row["cumulative_flops"] == last["cumulative_flops"]
        assert row["seconds"] == seconds
    assert plan_row["patch_sizes"] == [4, 1] and base_row["patch_sizes"] == [1]
    assert [p["cumulative_flops"] for p in plan_row["phases"]] == [p1["cumulative_flops"], p2["cumulative_flops"]]
    # The reference is the run named baseline (given second); lambda/K + 1 - lambda = 0.75/4 + 0.25 of its FLOPs.
    assert plan_row["reference"] == "baseline" and base_row["flops_vs_reference"] == 1.0
    assert plan_row["flops_vs_reference"] == p2["cumulative_flops"] / base["cumulative_flops"]
    assert plan_row["flops_vs_reference"] == pytest.approx(0.4375, rel=1e-12)
    # The Markdown is printed and written; its rows round the same numbers.
    table = (logged["out"] / "table.md").read_text()
    assert table.strip() in logged["stdout"]
    line = next(line for line in table.splitlines() if line.startswith("| two-phase "))
    loss = p2["token_level_valid_loss"]
    assert f"| K=4 → K=1 | {loss:.4f} | {math.exp(loss):.2f} | 8,192 |" in line and "| 0.438 |" in line


def test_evaluation_json_adds_columns(logged, tmp_path):
    scores = {"loss": 6.5, "perplexity": math.exp(6.5), "tokens": 1234, "bytes": 5000, "bits_per_byte": 2.3}
    result = {"checkpoint": "ckpt", "iteration": 8, "patch_size_trained": 1, "seq_length": 32, "source": "text",
              "inputs": ["heldout.jsonl"], "stride": 32, "token_level": scores}  # evaluate.py's result shape
    (tmp_path / "eval.json").write_text(json.dumps(result))
    out = _plot_runs(f"baseline={logged['base']}", logged["plan"], "--eval", f"baseline={tmp_path / 'eval.json'}",
                     "--json", tmp_path / "t.json").stdout
    assert "| eval loss (K=1) | eval ppl | eval bits/byte |" in out and "| 6.5000 | 665.14 | 2.3000 |" in out
    assert "heldout.jsonl, 1234 tokens" in out
    row = json.loads((tmp_path / "t.json").read_text())["runs"][0]
    assert row["evaluation"]["bits_per_byte"] == 2.3 and "points_plotted" not in row  # no --output: no figure


def test_tensorboard_directory_is_a_run(logged):
    plan_row = logged["rows"]["two-phase"]
    (tb,) = runs.table([runs.read_run(str(logged["out"] / "tb"))])
    assert tb["patch_sizes"] == [4, 1] and tb["cumulative_tokens"] == 8 * 1024 and tb["seconds"] is None
    assert tb["cumulative_flops"] == pytest.approx(plan_row["cumulative_flops"], rel=1e-6)  # float32
    assert tb["token_level_valid_loss"] == pytest.approx(plan_row["token_level_valid_loss"], rel=1e-6)


def test_resumed_and_hand_run_logs_join_like_the_plan(logged, tmp_path):
    """A phase resumed (steps logged twice, two summaries) and both phases logged to one file (README's runs by
    hand): the same points and numbers as the plan, wall time the sum of every invocation's."""
    plan = logged["plan"]
    phase1, phase2 = (open(plan / f"log.{p}.jsonl").read() for p in ("phase1", "phase2"))
    one_file = tmp_path / "by_hand.jsonl"
    one_file.write_text(phase1 + phase2)
    lines = phase1.splitlines(keepends=True)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "log.phase1.jsonl").write_text(phase1 + "".join(lines[3:]))  # steps 4.. again, a second summary
    shutil.copy(plan / "log.phase2.jsonl", resumed / "log.phase2.jsonl")
    reference = runs.read_run(str(plan))
    for spec in (str(one_file), f"{plan / 'log.phase1.jsonl'},{plan / 'log.phase2.jsonl'}", str(resumed)):
        joined = runs.read_run(spec)
        assert joined.train_points() == reference.train_points() and joined.valid_points() == reference.valid_points()
        assert joined.boundaries() == reference.boundaries()
    (row,) = runs.table([runs.read_run(str(resumed))])
    p1 = json_log.summaries(str(resumed / "log.phase1.jsonl"))
    assert len(p1) == 2 and row["seconds"] == sum(s["seconds"] for s in p1) + json_log.last_summary(
        str(plan / "log.phase2.jsonl"))["seconds"]


def _without_summary(logged, tmp_path):
    path = tmp_path / "running.jsonl"
    path.write_text("".join(line for line in open(logged["base"] / "log.jsonl") if '"summary"' not in line))
    return path


@pytest.mark.parametrize("case", ["missing path", "no summary", "no records", "unknown --eval run", "no runs",
                                  "duplicate names"])
def test_bad_input_is_one_line(case, logged, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args, expected = {
        "missing path": ([tmp_path / "nowhere"], "no such file or directory"),
        "no summary": ([_without_summary(logged, tmp_path)], "has no summary"),
        "no records": ([empty], "no records"),
        "unknown --eval run": ([logged["base"], "--eval", f"other={empty}"], "no run named other"),
        "no runs": (["--output", tmp_path / "x.png"], "required"),
        "duplicate names": ([f"a={logged['base']}", f"a={logged['plan']}"], "two runs are named a"),
    }[case]
    result = _plot_runs(*args, "--output", tmp_path / "x.png", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("plot_runs.py: error: ") and expected in lines[0], lines[0]
    assert not (tmp_path / "x.png").exists()


def test_reading_runs_imports_no_torch_and_no_matplotlib():
    code = ("import sys\nimport megatron_patch.experiments.runs, megatron_patch.cli.plot_runs\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron', 'matplotlib')))")
    assert run([PYTHON, "-c", code]).stdout.strip() == "[]"
