"""Runs as their training logs tell them (tools/plot_runs.py): the phases of a run joined in order on the run's
compute axis, and a comparison table. No torch: it runs on a laptop that holds only the logs.

A run is given as `[NAME=]PATH`, PATH one of
  - a `--log-json` file (one phase, or a plan's phases logged to one file by hand: split where K changes);
  - a directory or log prefix whose `log.phase1.jsonl` and `log.phase2.jsonl` (a `--patch-fraction` plan; the
    prefix is the plan's `--log-json` value, e.g. `ckpt/log.jsonl` or `ckpt/log`) or `log.jsonl` it holds;
  - log files of one run's phases, comma-separated, in order (`p1.jsonl,p2.jsonl`: phases run by hand);
  - a TensorBoard directory (`--tensorboard-dir`: scalars at step = cumulative tokens). TensorBoard stores
    float32 and no phase summary: its table has no wall time and FLOPs rounded to 7 digits; prefer the logs.

Every number of the table is the logs' own: the last phase summary's `token_level_valid_loss` (the model read at
K=1: comparable across phases and runs), `cumulative_tokens` and `cumulative_flops` (counted from the start of the
run); wall time is the sum of the `seconds` of every summary (a resumed phase logs one per invocation). Nothing is
recomputed but exp(loss) and the FLOPs ratio to the reference run (the run named `baseline`, else the first).
An `evaluate.py` JSON attached to a run adds its token-level loss, perplexity and bits per byte.
"""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from megatron_patch.errors import MegatronPatchError
from megatron_patch.training import json_log

REFERENCE_NAME = "baseline"


class RunError(MegatronPatchError):
    """Input that names no usable run (missing path, no records, a phase without summary)."""


@dataclass
class Phase:
    """One phase of a run: its step and validation records (the last logged for each iteration) on the run's axis."""

    patch_size: int
    source: str
    steps: List[dict]
    evals: List[dict]
    summaries: List[dict] = field(default_factory=list)  # one per invocation; empty for TensorBoard

    @property
    def summary(self) -> Optional[dict]:
        return self.summaries[-1] if self.summaries else None

    @property
    def seconds(self) -> Optional[float]:
        return sum(s["seconds"] for s in self.summaries) if self.summaries else None

    @property
    def end(self) -> Tuple[int, float]:
        """(cumulative tokens, cumulative FLOPs) where the phase ended."""
        last = self.summary or self.steps[-1]
        return last["cumulative_tokens"], last["cumulative_flops"]

    @property
    def complete(self) -> bool:
        return self.summary is None or self.summary["iteration"] >= self.summary["train_iters"]


@dataclass
class Run:
    name: str
    source: str
    phases: List[Phase]
    evaluation: Optional[dict] = None  # an evaluate.py result

    @property
    def patch_sizes(self) -> List[int]:
        return [p.patch_size for p in self.phases]

    def train_points(self) -> List[List[Tuple[int, float, float]]]:
        """Per phase: (cumulative tokens, cumulative FLOPs, train loss) of every step (phase 1: the K-target loss)."""
        return [[(s["cumulative_tokens"], s["cumulative_flops"], s["loss"]) for s in p.steps] for p in self.phases]

    def valid_points(self) -> List[Tuple[int, float, float]]:
        """(cumulative tokens, cumulative FLOPs, token-level validation loss) of every validation, all phases."""
        return [(e["cumulative_tokens"], e["cumulative_flops"], e["token_level_valid_loss"])
                for p in self.phases for e in p.evals if e.get("token_level_valid_loss") is not None]

    def boundaries(self) -> List[Tuple[int, float]]:
        """(cumulative tokens, cumulative FLOPs) at the end of every phase but the last."""
        return [p.end for p in self.phases[:-1]]


# Reading ------------------------------------------------------------------------------------------------------


def parse_spec(spec: str) -> Tuple[Optional[str], str]:
    """`NAME=PATH` -> (NAME, PATH); a bare PATH (even one holding '=' after a '/') -> (None, PATH)."""
    name, sep, path = spec.partition("=")
    if sep and name and os.sep not in name and path:
        return name, path
    return None, spec


def default_name(path: str) -> str:
    """A directory's name; a log file's stem, or its directory's name when the stem is `log` (or `log.phaseN`)."""
    path = os.path.normpath(path)
    if os.path.isdir(path):
        return os.path.basename(os.path.abspath(path))
    stem = os.path.basename(path)
    for suffix in (".jsonl", ".json", ".phase1", ".phase2"):
        stem = stem[: -len(suffix)] if stem.endswith(suffix) else stem
    if stem == "log":
        return os.path.basename(os.path.dirname(os.path.abspath(path))) or stem
    return stem


def log_files(path: str) -> List[str]:
    """The log files of the run at `path` (see the module's docstring), in phase order; [] for TensorBoard."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        if tensorboard_files(path) and not glob.glob(os.path.join(path, "log*.jsonl")):
            return []
        stem, ext = os.path.join(path, "log"), ".jsonl"
    else:
        stem, ext = os.path.splitext(path) if path.endswith(".jsonl") else (path, ".jsonl")
    phases = [f"{stem}.phase{i}{ext}" for i in (1, 2)]
    found = [p for p in phases if os.path.isfile(p)]
    single = f"{stem}{ext}"
    if found and os.path.isfile(single):
        raise RunError(f"{path}: holds both {single} and {' '.join(found)}: name the log file(s) to read")
    if found:
        if found[0] != phases[0]:
            raise RunError(f"{path}: {phases[1]} without {phases[0]}")
        return found
    if os.path.isfile(single):
        return [single]
    if not os.path.exists(path):
        raise RunError(f"{path}: no such file or directory")
    raise RunError(f"{path}: holds no log.jsonl, log.phase1.jsonl or TensorBoard events")


def tensorboard_files(path: str) -> List[str]:
    return sorted(glob.glob(os.path.join(path, "events.out.tfevents.*")))


def _last_per_iteration(records: List[dict]) -> List[dict]:
    """A resumed phase logs again the steps (and validations) it redoes: keep the last of each iteration."""
    by_iteration = {r["iteration"]: r for r in records}
    return [by_iteration[i] for i in sorted(by_iteration)]


def _phases_of_log(path: str) -> List[Phase]:
    """A log's phases: consecutive records of one patch size (a plan logged to one file by hand has two)."""
    try:
        records = json_log.read_records(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{path}: not a --log-json file ({e})") from None
    segments: List[Tuple[int, List[dict]]] = []
    for record in records:
        if not isinstance(record, dict):
            raise RunError(f"{path}: not a --log-json file (a line is {type(record).__name__}, not an object)")
        body = record.get("summary") or record.get("eval") or record
        if "cumulative_flops" not in body:
            continue  # written by a trainer without the compute axis (or not a step record)
        if not segments or body.get("patch_size") != segments[-1][0]:
            segments.append((body.get("patch_size"), []))
        segments[-1][1].append(record)
    if not segments:
        raise RunError(f"{path}: no records with cumulative_tokens/cumulative_flops (an empty log, or one "
                       f"written before the compute axis existed)")
    phases = []
    for patch_size, segment in segments:
        summaries = [r["summary"] for r in segment if "summary" in r]
        if not summaries:
            raise RunError(f"{path}: the K={patch_size} phase has no summary (it has not finished: a phase logs "
                           f"its summary when it ends)")
        steps = _last_per_iteration([r for r in segment if "summary" not in r and "eval" not in r])
        if not steps:
            raise RunError(f"{path}: the K={patch_size} phase logged no steps")
        evals = _last_per_iteration([r["eval"] for r in segment if "eval" in r])
        phases.append(Phase(patch_size, path, steps, evals, summaries))
    return phases


def _read_tensorboard(path: str) -> List[Phase]:
    """Phases from the trainer's TensorBoard scalars (step = cumulative tokens), split where train/patch_size
    changes. TensorBoard keeps float32 values and no summary."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as e:
        raise RunError(f"{path}: reading TensorBoard events needs the tensorboard package ({e})") from None
    events = EventAccumulator(path, size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags().get("scalars", []))
    needed = {"train/loss", "train/patch_size", "compute/cumulative_flops"}
    if not needed <= tags:
        raise RunError(f"{path}: TensorBoard events without {', '.join(sorted(needed - tags))} (not written by "
                       f"pretrain_patch_gpt.py --tensorboard-dir)")

    def series(tag):
        return {e.step: e.value for e in events.Scalars(tag)} if tag in tags else {}  # last value of a step

    loss, patch, flops = series("train/loss"), series("train/patch_size"), series("compute/cumulative_flops")
    valid = series("valid/token_level_valid_loss")
    phases: List[Phase] = []
    for tokens in sorted(loss):
        k = int(patch[tokens])
        if not phases or phases[-1].patch_size != k:
            phases.append(Phase(k, path, [], []))
        phases[-1].steps.append({"cumulative_tokens": tokens, "cumulative_flops": flops[tokens],
                                 "loss": loss[tokens], "patch_size": k})
    if not phases:
        raise RunError(f"{path}: TensorBoard events hold no training steps")
    for tokens in sorted(valid):
        phase = next((p for p in phases if p.steps[0]["cumulative_tokens"] <= tokens <= p.end[0]), phases[-1])
        phase.evals.append({"cumulative_tokens": tokens, "cumulative_flops": flops.get(tokens),
                            "token_level_valid_loss": valid[tokens], "patch_size": phase.patch_size})
    return phases


def read_run(spec: str) -> Run:
    """The run `[NAME=]PATH` names (see the module's docstring); raises RunError."""
    name, path = parse_spec(spec)
    parts = path.split(",") if not os.path.exists(path) else [path]
    files = [f for part in parts for f in log_files(part)]
    if len(parts) > 1 and len(files) < len(parts):
        raise RunError(f"{path}: a comma-separated run is made of log files (no TensorBoard directories)")
    phases = [phase for f in files for phase in _phases_of_log(f)] if files else _read_tensorboard(path)
    for before, after in zip(phases, phases[1:]):
        if after.steps[0]["cumulative_tokens"] <= before.end[0]:
            raise RunError(f"{path}: {after.source}'s steps start at {after.steps[0]['cumulative_tokens']} "
                           f"tokens, not after {before.source}'s end ({before.end[0]}): not phases of one run")
    return Run(name or default_name(parts[0]), path, phases)


def read_evaluation(path: str) -> dict:
    """An `evaluate.py --output` JSON (its token-level scores are what the table shows)."""
    try:
        with open(path) as f:
            result = json.load(f)
    except FileNotFoundError:
        raise RunError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{path}: not an evaluate.py JSON ({e})") from None
    if not isinstance(result, dict) or not isinstance(result.get("token_level"), dict) \
            or "loss" not in result["token_level"]:
        raise RunError(f"{path}: not an evaluate.py JSON (no token_level scores)")
    return result


def read_runs(specs: List[str], evaluations: List[str] = ()) -> List[Run]:
    """The runs `specs` name, with the `NAME=FILE` evaluate.py results attached; raises RunError."""
    if not specs:
        raise RunError("no runs given")
    runs = [read_run(spec) for spec in specs]
    names = [r.name for r in runs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise RunError(f"two runs are named {', '.join(duplicated)}: name them (NAME=PATH)")
    by_name = {r.name: r for r in runs}
    for spec in evaluations:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise RunError(f"--eval {spec}: expected NAME=FILE (NAME one of {', '.join(names)})")
        if name not in by_name:
            raise RunError(f"--eval {spec}: no run named {name} (runs: {', '.join(names)})")
        by_name[name].evaluation = read_evaluation(path)
    return runs


# The table ----------------------------------------------------------------------------------------------------


def reference_run(runs: List[Run]) -> Run:
    return next((r for r in runs if r.name == REFERENCE_NAME), runs[0])


def _exp(loss: Optional[float]) -> Optional[float]:
    return math.exp(loss) if loss is not None else None


def _phase_row(phase: Phase) -> dict:
    return {"patch_size": phase.patch_size, "log": phase.source,
            "iteration": (phase.summary or phase.steps[-1]).get("iteration"), "cumulative_tokens": phase.end[0],
            "cumulative_flops": phase.end[1], "seconds": phase.seconds, "complete": phase.complete}


def table(runs: List[Run]) -> List[dict]:
    """One row per run: the logs' final numbers (see the module's docstring), unrounded."""
    reference = reference_run(runs)
    reference_flops = reference.phases[-1].end[1]
    rows = []
    for run in runs:
        last = run.phases[-1]
        if last.summary is not None:
            final_loss = last.summary["token_level_valid_loss"]
        else:  # TensorBoard: the last validation
            final_loss = run.valid_points()[-1][2] if run.valid_points() else None
        tokens, flops = last.end
        seconds = [p.seconds for p in run.phases]
        row = {
            "run": run.name,
            "source": run.source,
            "phases": [_phase_row(p) for p in run.phases],
            "patch_sizes": run.patch_sizes,
            "token_level_valid_loss": final_loss,
            "token_level_valid_ppl": _exp(final_loss),
            "cumulative_tokens": tokens,
            "cumulative_flops": flops,
            "reference": reference.name,
            "flops_vs_reference": flops / reference_flops if reference_flops else None,
            "seconds": sum(seconds) if None not in seconds else None,
            "complete": all(p.complete for p in run.phases),
        }
        if run.evaluation is not None:
            scores = run.evaluation["token_level"]
            row["evaluation"] = {"loss": scores["loss"], "perplexity": scores.get("perplexity"),
                                 "bits_per_byte": scores.get("bits_per_byte"), "tokens": scores.get("tokens"),
                                 "source": run.evaluation.get("source"), "inputs": run.evaluation.get("inputs"),
                                 "split": run.evaluation.get("split"), "checkpoint": run.evaluation.get("checkpoint"),
                                 "iteration": run.evaluation.get("iteration")}
        rows.append(row)
    return rows


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def phases_label(patch_sizes: List[int]) -> str:
    return " → ".join(f"K={k}" for k in patch_sizes)


def markdown(rows: List[dict]) -> str:
    """The table in Markdown (rounded for reading; the JSON holds the logs' values)."""
    evaluated = any("evaluation" in r for r in rows)
    reference = rows[0]["reference"]
    header = ["run", "phases", "token-level valid loss", "valid ppl", "tokens", "model FLOPs",
              f"FLOPs vs {reference}", "wall time (s)"]
    if evaluated:
        header += ["eval loss (K=1)", "eval ppl", "eval bits/byte"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        name = r["run"] if r["complete"] else f"{r['run']} (stopped early)"
        cells = [name, phases_label(r["patch_sizes"]), _fmt(r["token_level_valid_loss"], ".4f"),
                 _fmt(r["token_level_valid_ppl"], ".2f"), f"{r['cumulative_tokens']:,}",
                 _fmt(r["cumulative_flops"], ".4g"), _fmt(r["flops_vs_reference"], ".3f"), _fmt(r["seconds"], ".1f")]
        if evaluated:
            e = r.get("evaluation") or {}
            cells += [_fmt(e.get("loss"), ".4f"), _fmt(e.get("perplexity"), ".2f"), _fmt(e.get("bits_per_byte"), ".4f")]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    for r in rows:
        e = r.get("evaluation")
        if e:
            what = " ".join(e["inputs"] or []) if e["source"] == "text" else f"the {e['split']} split"
            notes.append(f"{r['run']}: {what}, {e['tokens']} tokens (checkpoint {e['checkpoint']}, "
                         f"iteration {e['iteration']})")
    if notes:
        lines += ["", "eval: tools/evaluate.py at token level on " + "; ".join(notes)]
    return "\n".join(lines)


def to_json(rows: List[dict], extra: Optional[Dict[str, dict]] = None) -> dict:
    """{"runs": rows} with each row's `extra[run]` (e.g. the points a plot drew) merged in."""
    return {"runs": [dict(r, **(extra or {}).get(r["run"], {})) for r in rows]}
