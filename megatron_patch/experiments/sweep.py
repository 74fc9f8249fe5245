"""A grid of runs (tools/sweep.py): model sizes x K x lambda x token budget x seed, each run a two-phase plan
(0 < lambda < 1), a token-only baseline (lambda = 0) or patch-only training (lambda = 1), run one after another here
or submitted to Slurm, evaluated at token level on the same documents, and compared in one table. No torch: a grid
is planned, checked and submitted from a login node; runs are subprocesses (pretrain_patch_gpt.py, tools/evaluate.py).

The grid file (YAML, or JSON) is a mapping:

  out: runs/sweep                  # where runs and results go (tools/sweep.py --out overrides)
  nproc_per_node: 1                # processes per run (torchrun when > 1)
  common: {data-path: ..., tokenizer-model: ..., seq-length: 256, global-batch-size: 32, micro-batch-size: 8}
  sizes: {tiny: tiny, small: {model-preset: cpu-small, num-layers: 6}}   # a preset name, or trainer flags
  K: [2, 4, 8]
  lambda: [0, 2/3, 1]
  tokens: [1536000]
  seeds: [1]                       # default: the trainer's seed
  variants: {paper: {}, p2-lr-2e-3: {phase2-lr: 2e-3}}   # optional: named flag sets, another axis
  eval: {text: heldout.jsonl, seq-length: 256, micro-batch-size: 8}      # tools/evaluate.py flags
  slurm: {sbatch: [-N, 1, --time, "04:00:00"], env: {OPTIMIZER_ARGS: --bf16}}   # for --slurm

Flags are `name: value` (a list gives several values, `true` a bare switch) or an argument list. The runs are the
cross product; lambda = 0 ignores K (one baseline per size, budget and seed, named K=1). `--seq-length` and
`--global-batch-size` describe the token-level run, as for --patch-fraction: lambda = 1 trains the whole budget at
K (K*T tokens x G/K samples per step) and evaluates that model at token level. A variant's flags that only set a
plan's phases (--phase1-lr, --phase2-lr-warmup-iters, ...) do not apply to baselines and patch-only runs: the
variants share those runs (named without a variant when no other flag of the variant applies).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Dict, List, Optional

from megatron_patch.checkpoint import layout
from megatron_patch.config.flags import parse_args
from megatron_patch.config.plan import PER_PHASE_FLAGS, phases_to_run
from megatron_patch.config.schema import ConfigError, TrainingConfig
from megatron_patch.errors import MegatronPatchError
from megatron_patch.experiments.runs import Run, RunError, read_evaluation, read_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
KEYS = ("out", "nproc_per_node", "common", "sizes", "K", "lambda", "tokens", "seeds", "variants", "eval", "slurm")
# Flags each run gets from its grid point and directory: the grid must not set them.
PER_RUN_FLAGS = ("--patch-size", "--patch-fraction", "--train-tokens", "--train-iters", "--seed", "--save", "--load",
                 "--log-json", "--phase", "--pretrained-checkpoint")
EVAL_OWN_FLAGS = ("--load", "--output", "--iteration")
PLAN_PHASE_FLAGS = tuple("--" + name.replace("_", "-") for name in PER_PHASE_FLAGS)  # --phase1-lr, ...
COLUMNS = ["run", "size", "K", "lambda", "tokens", "seed", "variant", "ppl", "bits_per_byte", "eval_loss", "valid_loss",
           "trained_tokens", "flops", "wall_seconds", "flops_vs_baseline"]


class GridError(MegatronPatchError, ValueError):
    """A grid file that cannot be run; its message is one line naming the file."""


@dataclass
class Point:
    """One run of the grid: where it stands on every axis, and the commands that make it."""

    size: str
    k: int
    fraction: float
    tokens: int
    seed: int
    variant: str = ""  # "" when the grid has no variants, or the run is shared by them
    directory: str = ""
    train_command: List[str] = field(default_factory=list)
    eval_command: List[str] = field(default_factory=list)
    final_checkpoint: str = ""
    final_iteration: int = 0
    config: Optional[TrainingConfig] = None  # the token-level description (what --patch-fraction reads)

    @property
    def name(self) -> str:
        name = f"size={self.size}_K={self.k}_lambda={self.fraction:.4g}_tokens={self.tokens}_seed={self.seed}"
        return f"{name}_variant={self.variant}" if self.variant else name

    @property
    def kind(self) -> str:
        return "baseline" if self.fraction == 0 else "patch-only" if self.fraction == 1 else "two-phase"

    @property
    def log(self) -> str:
        """The --log-json value: a plan writes train.phase1.jsonl and train.phase2.jsonl beside it."""
        return os.path.join(self.directory, "train.jsonl")

    @property
    def eval_json(self) -> str:
        return os.path.join(self.directory, "eval.json")

    def trained(self) -> bool:
        return layout.latest_iteration(self.final_checkpoint) == self.final_iteration

    def evaluation(self) -> Optional[dict]:
        """The run's evaluate.py result if it scores the final checkpoint, else None."""
        try:
            result = read_evaluation(self.eval_json)
        except RunError:
            return None
        return result if result.get("iteration") == self.final_iteration else None

    def finished(self) -> bool:
        return self.trained() and self.evaluation() is not None


@dataclass
class Grid:
    path: str
    out: str
    nproc_per_node: int
    points: List[Point]
    slurm_sbatch: List[str]
    slurm_env: Dict[str, str]
    common: List[str]
    sizes: Dict[str, List[str]]
    variants: Dict[str, List[str]]


# Reading the grid ---------------------------------------------------------------------------------------------


def _load(path: str):
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise GridError(f"{path}: cannot read it ({e.strerror or e})") from None
    if path.endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise GridError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    try:
        import yaml  # PyYAML is a dependency of megatron-core's tooling; JSON grids need nothing
    except ImportError:
        raise GridError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or write the grid as .json") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise GridError(f"{path}: invalid YAML{where}: {problem}") from None


def flag_list(value, what: str, path: str) -> List[str]:
    """`{name: value}` (a list: several values; true: a switch; false/null: left out) or an argument list -> argv."""
    if isinstance(value, list):
        if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
            raise GridError(f"{path}: {what}: an argument list holds only strings and numbers")
        return [str(v) for v in value]
    if not isinstance(value, dict):
        raise GridError(f"{path}: {what}: expected a mapping of flags (name: value) or a list of arguments, "
                        f"got {type(value).__name__}")
    argv = []
    for name, v in value.items():
        flag = name if str(name).startswith("-") else f"--{name}"
        if v is True:
            argv.append(flag)
        elif v is False or v is None:
            continue
        elif isinstance(v, list):
            argv += [flag, *map(str, v)]
        elif isinstance(v, (str, int, float)):
            argv += [flag, str(v)]
        else:
            raise GridError(f"{path}: {what}: {name}: expected a value, a list or true, got {type(v).__name__}")
    return argv


def _axis(raw: dict, key: str, path: str, parse, default=None) -> list:
    values = raw.get(key, default)
    if values is None:
        raise GridError(f"{path}: missing {key!r} (a list of values)")
    values = values if isinstance(values, list) else [values]
    if not values:
        raise GridError(f"{path}: {key!r} is empty")
    out = []
    for v in values:
        try:
            out.append(parse(v))
        except (TypeError, ValueError, ZeroDivisionError) as e:
            raise GridError(f"{path}: {key}: {v!r}: {e}") from None
    if len(set(out)) < len(out):
        raise GridError(f"{path}: {key}: a value is given twice ({values})")
    return out


def _integer(low: int):
    def parse(v) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise ValueError("expected an integer")
        number = float(v) if isinstance(v, str) else v
        if number != int(number):
            raise ValueError("expected an integer")
        if int(number) < low:
            raise ValueError(f"must be >= {low}")
        return int(number)
    return parse


def _fraction(v) -> float:
    """lambda: a number or a fraction `a/b` in [0, 1]."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError("expected a number in [0, 1] (or a fraction like 2/3)")
    number = float(Fraction(v.strip())) if isinstance(v, str) else float(v)
    if not 0 <= number <= 1:
        raise ValueError("lambda must be in [0, 1] (0: token-only baseline, 1: patch-only)")
    return number


def _name(name, what: str, path: str) -> str:
    if not isinstance(name, str) or not name or any(c in name for c in "/_= "):
        raise GridError(f"{path}: {what}: {name!r}: a name is a word without '/', '_', '=' or spaces")
    return name


def _variants(raw: dict, path: str) -> Dict[str, List[str]]:
    variants = raw.get("variants")
    if variants is None:
        return {"": []}
    if not isinstance(variants, dict) or not variants:
        raise GridError(f"{path}: variants: expected a mapping (name: trainer flags, e.g. paper: {{}})")
    return {_name(name, "variants", path): flag_list(flags or {}, f"variants: {name}", path)
            for name, flags in variants.items()}


def without_plan_phase_flags(argv: List[str]) -> List[str]:
    """`argv` less the flags that set a plan's phases (each takes one value)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in PLAN_PHASE_FLAGS:
            skip = True
        else:
            out.append(arg)
    return out


def _sizes(raw: dict, path: str) -> Dict[str, List[str]]:
    sizes = raw.get("sizes")
    if sizes is None:
        raise GridError(f"{path}: missing 'sizes' (name: a model preset, or trainer flags)")
    if isinstance(sizes, list):  # a list of preset names
        if not all(isinstance(s, str) for s in sizes):
            raise GridError(f"{path}: sizes: a list holds preset names; name other shapes (name: flags)")
        sizes = {s: s for s in sizes}
    if not isinstance(sizes, dict) or not sizes:
        raise GridError(f"{path}: sizes: expected a mapping (name: a model preset, or trainer flags)")
    return {_name(name, "sizes", path): ["--model-preset", flags] if isinstance(flags, str)
            else flag_list(flags, f"sizes: {name}", path) for name, flags in sizes.items()}


def read_grid(path: str, out: Optional[str] = None, python: str = sys.executable) -> Grid:
    """The grid in `path` with every run's commands, each run checked as the trainer would check it (a plan that
    cannot be made, a flag it refuses); raises GridError (one line naming the file) or exits 2 on a bad flag."""
    raw = _load(path)
    if not isinstance(raw, dict):
        raise GridError(f"{path}: expected a mapping at the top (keys: {', '.join(KEYS)}), got {type(raw).__name__}")
    unknown = [str(k) for k in raw if k not in KEYS]
    if unknown:
        raise GridError(f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(KEYS)})")
    out = out or raw.get("out")
    if not isinstance(out, str) or not out:
        raise GridError(f"{path}: no output directory: give 'out' in the grid or --out")
    nproc = _axis(raw, "nproc_per_node", path, _integer(1), default=1)
    if len(nproc) != 1:
        raise GridError(f"{path}: nproc_per_node: one number, not a list")
    common = flag_list(raw.get("common", {}), "common", path)
    sizes, variants = _sizes(raw, path), _variants(raw, path)
    for flag in PER_RUN_FLAGS:
        where = [w for w, argv in (("common", common), *((f"sizes: {n}", a) for n, a in sizes.items()),
                                   *((f"variants: {n}", a) for n, a in variants.items())) if flag in argv]
        if where:
            raise GridError(f"{path}: {where[0]} sets {flag}, which the sweep sets for each run (axes and run "
                            f"directory)")
    fractions = _axis(raw, "lambda", path, _fraction)
    ks = _axis(raw, "K", path, _integer(2), default=[1] if set(fractions) == {0.0} else None)
    tokens = _axis(raw, "tokens", path, _integer(1))
    seeds = _axis(raw, "seeds", path, _integer(0), default=[TrainingConfig().seed])
    names = {}
    for fraction in fractions:
        name = f"{fraction:.4g}"
        if name in names:
            raise GridError(f"{path}: lambda: {names[name]} and {fraction} have the same name {name}")
        names[name] = fraction
    evaluation = flag_list(raw.get("eval", {}), "eval", path)
    for flag in EVAL_OWN_FLAGS:
        if flag in evaluation:
            raise GridError(f"{path}: eval sets {flag}, which the sweep sets for each run")
    if "--text" not in evaluation and "--split-name" not in evaluation:
        evaluation += ["--split-name", "valid"]
    slurm = raw.get("slurm", {})
    if not isinstance(slurm, dict) or set(slurm) - {"sbatch", "env"}:
        raise GridError(f"{path}: slurm: expected a mapping with 'sbatch' (options) and/or 'env' (settings)")
    sbatch = flag_list(slurm.get("sbatch", []), "slurm: sbatch", path)
    env = slurm.get("env", {})
    if not isinstance(env, dict):
        raise GridError(f"{path}: slurm: env: expected a mapping of settings (NAME: value)")

    points, seen = [], set()
    shared: Dict[tuple, str] = {}  # flags of a run without a plan -> the variant that names it ("": no flags)
    for size, k, fraction, budget, seed, variant in itertools.product(sizes, ks, fractions, tokens, seeds, variants):
        point = Point(size, 1 if fraction == 0 else k, fraction, budget, seed, variant)
        flags = variants[variant]
        if point.kind != "two-phase":
            flags = without_plan_phase_flags(flags)
            point.variant = shared.setdefault(tuple(flags), variant if flags else "")
        if point.name in seen:  # lambda = 0: one baseline whatever K; runs the variants share
            continue
        seen.add(point.name)
        point.directory = os.path.join(out, "runs", point.name)
        _commands(point, common + sizes[size] + flags, evaluation, nproc[0], python, path)
        points.append(point)
    return Grid(path, out, nproc[0], points, sbatch, {str(k): str(v) for k, v in env.items()}, common, sizes,
                variants)


def launcher(nproc: int, python: str) -> List[str]:
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 \
        else [python]


def _commands(point: Point, flags: List[str], evaluation: List[str], nproc: int, python: str, path: str) -> None:
    """Fill the point's train and eval commands, final checkpoint and its iteration, checked by the trainer's own
    parser and plan (no process started)."""
    budget = ["--train-tokens", str(point.tokens), "--seed", str(point.seed)]
    prog = f"{path}: run {point.name}"  # a flag the trainer refuses: argparse's one line, named so
    try:
        described = parse_args(flags + budget, prog=prog)  # the token-level run: T and G
        if point.kind == "baseline":
            run = ["--patch-size", "1"]
        elif point.kind == "two-phase":
            run = ["--patch-size", str(point.k), "--patch-fraction", repr(point.fraction)]
        else:
            if described.global_batch_size is None or described.global_batch_size % point.k:
                raise ConfigError(f"lambda=1 reads --global-batch-size / K samples of K x --seq-length tokens: give "
                                  f"a --global-batch-size divisible by {point.k}")
            run = ["--patch-size", str(point.k), "--seq-length", str(point.k * described.seq_length),
                   "--global-batch-size", str(described.global_batch_size // point.k)]
        if point.kind == "two-phase":
            save = ["--save", point.directory]
        else:
            ckpt = os.path.join(point.directory, "ckpt")
            save = ["--save", ckpt, "--load", ckpt]
        argv = flags + budget + run + save + ["--log-json", point.log]
        phases, _ = phases_to_run(parse_args(argv, prog=prog), nproc)
    except ConfigError as e:
        raise GridError(f"{prog}: {e}") from None
    point.config = described
    point.final_checkpoint, point.final_iteration = phases[-1].save, phases[-1].train_iters
    point.train_command = [*launcher(nproc, python), os.path.join(ROOT, "pretrain_patch_gpt.py"), *argv]
    point.eval_command = [python, os.path.join(ROOT, "tools", "evaluate.py"), "--load", point.final_checkpoint,
                          *evaluation, "--output", point.eval_json]


# Slurm --------------------------------------------------------------------------------------------------------

# trainer flag -> slurm/phase.sbatch setting (README.md, "Slurm"); the other flags go to EXTRA_ARGS.
SLURM_SETTINGS = {"--data-path": "DATA_PATH", "--tokenizer-model": "TOKENIZER_MODEL",
                  "--tokenizer-type": "TOKENIZER_TYPE", "--vocab-file": "VOCAB_FILE", "--merge-file": "MERGE_FILE",
                  "--vocab-size": "VOCAB_SIZE", "--seq-length": "SEQ_LENGTH",
                  "--global-batch-size": "GLOBAL_BATCH_SIZE", "--micro-batch-size": "MICRO_BATCH_SIZE"}


def _split_settings(argv: List[str], path: str, what: str):
    """(settings, remaining flags) of an argument list whose flags each take at most one value."""
    settings, rest, i = {}, [], 0
    while i < len(argv):
        arg = argv[i]
        values = list(itertools.takewhile(lambda a: not a.startswith("--"), argv[i + 1:]))
        if arg in SLURM_SETTINGS:
            if len(values) != 1:
                raise GridError(f"{path}: --slurm: {what} {arg} takes one value there (slurm/phase.sbatch passes "
                                f"{SLURM_SETTINGS[arg]} as one argument), got {len(values)}")
            settings[SLURM_SETTINGS[arg]] = values[0]
        else:
            rest += [arg, *values]
        i += 1 + len(values)
    bad = [a for a in rest if not a or any(c.isspace() for c in a)]
    if bad:
        raise GridError(f"{path}: --slurm: {what}: {bad[0]!r}: slurm/phase.sbatch splits its *_ARGS settings at "
                        f"spaces, so no argument may hold one")
    return settings, rest


def slurm_submission(grid: Grid, point: Point, python: str = sys.executable):
    """(environment settings, command) that queue `point` through slurm/submit_two_phase.sh: phase 1 -> phase 2
    with CKPT_DIR = the run's directory (the layout a local run writes). Only two-phase points: the scripts run a
    plan; raises GridError for others."""
    if point.kind != "two-phase":
        raise GridError(f"{grid.path}: {point.name}: slurm/ runs two-phase plans (0 < lambda < 1) only; run the "
                        f"{point.kind} points with tools/sweep.py without --slurm")
    settings, extra = _split_settings(grid.common + grid.variants[point.variant], grid.path, "common and variant")
    model_settings, model = _split_settings(grid.sizes[point.size], grid.path, f"sizes: {point.size}")
    settings.update(model_settings)
    if not model:
        raise GridError(f"{grid.path}: --slurm: sizes: {point.size} gives no model flags (slurm/phase.sbatch "
                        f"would use its default MODEL_ARGS)")
    settings.update(CKPT_DIR=point.directory, TRAIN_TOKENS=str(point.tokens), PATCH_SIZE=str(point.k),
                    PATCH_FRACTION=repr(point.fraction), MODEL_ARGS=" ".join(model),
                    EXTRA_ARGS=" ".join([*extra, "--seed", str(point.seed)]), PYTHON=python)
    settings.update(grid.slurm_env)
    output = os.path.join(point.directory, "%x-%j.out")
    return settings, ["bash", os.path.join(ROOT, "slurm", "submit_two_phase.sh"), *grid.slurm_sbatch,
                      f"--output={output}"]


def shell_line(settings: Dict[str, str], command: List[str]) -> str:
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in settings.items()), shlex.join(command)])


# Results ------------------------------------------------------------------------------------------------------


def read_point(point: Point) -> Run:
    """The run's logs (megatron_patch/experiments/runs.py) with its evaluation attached; raises RunError."""
    run = read_run(os.path.abspath(point.log))  # a bare path: the name holds '=', which NAME=PATH would split at
    run.name, run.evaluation = point.name, point.evaluation()
    return run


def rows(points: List[Point], runs: Dict[str, Run]) -> List[dict]:
    """One row per finished point: its axes, the evaluation's token-level scores, the logs' final validation loss,
    tokens, FLOPs and training seconds, and its FLOPs over the baseline's of the same size, budget and seed."""
    out = []
    for point in points:
        run = runs.get(point.name)
        if run is None:
            continue
        last = run.phases[-1]
        seconds = [p.seconds for p in run.phases]
        scores = (run.evaluation or {}).get("token_level", {})
        out.append({
            "run": point.name, "size": point.size, "K": point.k, "lambda": point.fraction, "tokens": point.tokens,
            "seed": point.seed, "variant": point.variant, "ppl": scores.get("perplexity"),
            "bits_per_byte": scores.get("bits_per_byte"), "eval_loss": scores.get("loss"),
            "valid_loss": last.summary.get("token_level_valid_loss") if last.summary else None,
            "trained_tokens": last.end[0], "flops": last.end[1],
            "wall_seconds": sum(seconds) if None not in seconds else None, "flops_vs_baseline": None,
        })
    baselines = {(r["size"], r["tokens"], r["seed"], r["variant"]): r["flops"] for r in out if r["lambda"] == 0}
    for r in out:
        base = baselines.get((r["size"], r["tokens"], r["seed"], r["variant"]),
                             baselines.get((r["size"], r["tokens"], r["seed"], "")))
        r["flops_vs_baseline"] = r["flops"] / base if base else None
    return out


def to_csv(table: List[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in table:
        writer.writerow({k: ("" if r[k] is None else r[k]) for k in COLUMNS})
    return buffer.getvalue()


def _cell(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def to_markdown(table: List[dict]) -> str:
    header = ["run", "size", "K", "lambda", "tokens", "seed", "variant", "PPL", "bits/byte", "eval loss",
              "valid loss (log)", "model FLOPs", "wall time (s)", "FLOPs vs baseline"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table:
        cells = [r["run"], r["size"], str(r["K"]), f"{r['lambda']:.4g}", f"{r['tokens']:,}", str(r["seed"]),
                 r["variant"] or "-",
                 _cell(r["ppl"], ".2f"), _cell(r["bits_per_byte"], ".4f"), _cell(r["eval_loss"], ".4f"),
                 _cell(r["valid_loss"], ".4f"), _cell(r["flops"], ".4g"), _cell(r["wall_seconds"], ".1f"),
                 _cell(r["flops_vs_baseline"], ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def series(table: List[dict], x: str, fixed: tuple) -> Dict[tuple, List[tuple]]:
    """For a plot of PPL against `x` ("K" or "lambda"): (values of `fixed`) -> [(x, mean PPL over seeds)], sorted.
    Against lambda, each K's line starts at its size's baseline (lambda = 0, K=1)."""
    groups: Dict[tuple, Dict[float, List[float]]] = {}
    for r in table:
        if r["ppl"] is None or (x == "K" and r["lambda"] == 0):
            continue
        keys = [(tuple(r[f] for f in fixed))]
        if x == "lambda" and r["lambda"] == 0:  # the baseline joins every K (and variant sharing it) of its size
            free = ("K", "variant") if not r["variant"] else ("K",)
            keys = [key for key in {tuple(o[f] for f in fixed) for o in table if o["lambda"] > 0}
                    if all(key[i] == r[f] for i, f in enumerate(fixed) if f not in free)] or keys
        for key in keys:
            groups.setdefault(key, {}).setdefault(r[x], []).append(r["ppl"])
    return {key: sorted((v, math.fsum(p) / len(p)) for v, p in by_x.items()) for key, by_x in sorted(groups.items())}

