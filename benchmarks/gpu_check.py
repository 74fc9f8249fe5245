#!/usr/bin/env python3
"""The GPU check: what a cluster user asks of this trainer before giving it a job, measured in a few minutes on
one H100/H200 (more GPUs add the parallel step). benchmarks/gpu_check.sh sets up a bare machine and runs this.

Steps, each run a bounded subprocess of pretrain_patch_gpt.py (budgets on one H100; --cpu-smoke: tiny sizes on
the CPU, about 3 minutes on 2 cores):
  data         the Python docs corpus (offline), a 4k SentencePiece tokenizer, preprocessing for K=4    ~20 s
  correctness  cpu-small (4 layers, hidden 128), 20 steps at K=4 and at K=1: GPU fp32 against the same run
               on the CPU (max abs. loss difference), and GPU bf16 against GPU fp32                      ~90 s
  speed        paper-1.3b, bf16, 8192 tokens per step (K=1: 4 x 2048; K=4: 1 x 8192 = 2048 patches),
               12 steps: tokens/s, TFLOP/s and MFU per device (against the trainer's dense bf16 table),
               peak allocated memory; local layers with SDPA (flash) and, where Transformer Engine
               imports, TE layers; K=4's speed-up against its FLOP ratio                            ~150 s
  plan         a 20-step two-phase plan (K=4, lambda=1/2) with checkpoints, stopped at step 7 and
               resumed, against the same plan run straight through                                   ~40 s
  parallel     (2+ GPUs; always in --cpu-smoke) TP=2 and DP=2 against one device, K=4 fp32, 20 steps  ~60 s

Budget on one H100: gpu_check.sh's setup ~2.5 min (a Transformer Engine attempt of at most 90 s included), the
steps ~5 min, so under 8 minutes, most of it compute; with 2+ GPUs the parallel step adds ~1 min.

Writes OUT/gpu_check.md and OUT/gpu_check.json (one table) and exits 1 if a check fails (a difference over its
bound, or a run that failed); the speed rows are measurements, not checks, unless their run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = 20  # of every correctness run
STEP_NAMES = ("correctness", "speed", "plan", "parallel")  # after the data, in this order


class RunFailed(Exception):
    pass


class Check:
    """Runs the training subprocesses of the check and collects the table's rows."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.rows, self.failed, self.cache = [], False, {}
        self.timings, self.peak_memory = {}, {}  # per run: seconds, and GB (peak allocated; CPU: resident)
        self.smoke = args.cpu_smoke

    # -- running ---------------------------------------------------------------------------------------------------
    def train(self, name: str, flags: list, nproc: int = 1, cpu: bool = False, log_name: str | None = None) -> list:
        """The --log-json step records of one run (a plan's: phase 1's, then phase 2's; a run resumed under the
        same `log_name` appends, and the last record of each step counts); RunFailed with the run's last error line
        if it fails."""
        log = self.out / "runs" / f"{log_name or name}.jsonl"
        log.parent.mkdir(parents=True, exist_ok=True)
        launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      "--nproc-per-node", str(nproc)]
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="") if cpu else dict(os.environ)
        command = [*launch, str(ROOT / "pretrain_patch_gpt.py"), *flags, "--log-json", str(log), "--log-interval",
                   "1"]
        started = time.time()
        print(f"gpu_check: {name} ...", flush=True)
        try:
            result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                                    timeout=self.args.run_timeout)
        except subprocess.TimeoutExpired:
            raise RunFailed(f"timed out after {self.args.run_timeout} s (--run-timeout)") from None
        finally:
            self.timings[name] = round(time.time() - started, 1)
        (self.out / "runs" / f"{name}.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            raise RunFailed(f"exit {result.returncode}: {lines[-1] if lines else 'no output'}")
        print(f"gpu_check: {name}: {self.timings[name]} s", flush=True)
        records = []
        for path in (log, log.with_suffix(".phase1.jsonl"), log.with_suffix(".phase2.jsonl")):
            if path.exists():
                with open(path) as f:
                    lines = [json.loads(line) for line in f if line.strip()]
                records += {r["iteration"]: r for r in lines if "iteration" in r and "loss" in r}.values()
        if records:
            self.peak_memory[name] = round(max(r["peak_memory_bytes"] for r in records) / 1e9, 2)
        return records

    def row(self, step: str, what: str, measured: str, bound: str = "", ok: bool | None = None,
            result: str = "measured") -> None:
        """A row of the table: a check (`ok` given: pass / FAIL) or a measurement (`result`)."""
        result = result if ok is None else "pass" if ok else "FAIL"
        self.failed |= ok is False
        self.rows.append({"step": step, "check": what, "measured": measured, "bound": bound, "result": result})

    def compare(self, step: str, what: str, runs, bound: float) -> None:
        """A row for the largest |loss difference| between two runs' steps (each a thunk giving its records)."""
        try:
            a, b = (run() for run in runs)
        except RunFailed as e:
            self.row(step, what, f"run failed: {e}", f"<= {bound:g}", False)
            return
        if not a or len(a) != len(b):
            self.row(step, what, f"the runs logged {len(a)} and {len(b)} steps", f"<= {bound:g}", False)
            return
        diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))
        self.row(step, what, f"{diff:.2e} (of {len(a)} steps; first step {abs(a[0]['loss'] - b[0]['loss']):.1e})",
                 f"<= {bound:g}", diff <= bound)

    def cached(self, name: str, flags: list, **kwargs):
        """A thunk for a run that several checks compare against: run once."""
        def get():
            if name not in self.cache:
                self.cache[name] = self.train(name, flags, **kwargs)
            return self.cache[name]
        return get

    # -- the steps -------------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        data = self.out / "data"
        data.mkdir(parents=True, exist_ok=True)
        started = time.time()
        for tool in (["examples/python_docs_corpus.py", "--output", str(data / "corpus.jsonl")],
                     ["tools/train_tokenizer.py", "--input", str(data / "corpus.jsonl"), "--model-prefix",
                      str(data / "tok"), "--vocab-size", "4000"],
                     ["tools/preprocess_data.py", "--input", str(data / "corpus.jsonl"), "--output-prefix",
                      str(data / "docs"), "--tokenizer-model", str(data / "tok.model"), "--append-eod",
                      "--patch-size", "4", "--workers", "2"]):
            result = subprocess.run([sys.executable, *tool], cwd=ROOT, capture_output=True, text=True)
            if result.returncode != 0:
                lines = [line for line in result.stderr.splitlines() if line.strip()] or ["no output"]
                raise RunFailed(f"{tool[0]} exited {result.returncode}: {lines[-1]}")
        self.timings["data"] = round(time.time() - started, 1)
        self.data = ["--data-path", str(data / "docs_text_document"), "--tokenizer-model", str(data / "tok.model"),
                     "--data-cache-path", str(data / "cache"), "--split", "100,0,0", "--num-workers", "0"]

    def small(self, k: int, extra=()) -> list:
        """The correctness model: 20 steps of 16 samples x 256 tokens (tiny model, 8 x 128 in --cpu-smoke)."""
        size = (["--model-preset", "tiny", "--seq-length", "128", "--global-batch-size", "8", "--micro-batch-size",
                 "4"] if self.smoke else
                ["--model-preset", "cpu-small", "--seq-length", "256", "--global-batch-size", "16",
                 "--micro-batch-size", "8"])
        return [*size, *self.data, "--recipe", "paper", "--lr", "1e-3", "--lr-warmup-iters", "2", "--patch-size",
                str(k), "--train-iters", str(STEPS), "--transformer-impl", "local", *extra]

    def correctness(self) -> None:
        for k in (4, 1):
            device = self.cached(f"K{k}_fp32", self.small(k))
            self.compare("correctness", f"K={k} fp32: {self.device} against the CPU, max abs. loss difference",
                         [device, self.cached(f"K{k}_fp32_cpu", self.small(k), cpu=True)], self.args.max_loss_diff)
            self.compare("correctness", f"K={k}: bf16 against fp32 on {self.device}, max abs. loss difference",
                         [device, self.cached(f"K{k}_bf16", self.small(k, ["--bf16"]))], self.args.max_bf16_gap)

    def speed(self) -> None:
        model = (["--model-preset", "tiny"] if self.smoke else ["--model-preset", "paper-1.3b"])
        tokens = 512 if self.smoke else 8192  # per step, both K
        per_sample = tokens // 4
        measured = {}
        impls = [("local", ["--transformer-impl", "local", "--attention-backend", "flash"])]
        if self.args.te:
            impls.append(("te", ["--transformer-impl", "transformer_engine"]))
        else:
            self.row("speed", "Transformer Engine layers", self.args.te_missing, result="skipped")
        for impl, flags in impls:
            for k in (1, 4):
                seq, batch = (per_sample, tokens // per_sample) if k == 1 else (tokens, 1)
                name = f"speed_{impl}_K{k}"
                run = [*model, *self.data, "--bf16", "--lr", "3e-4", "--patch-size", str(k), "--seq-length", str(seq),
                       "--micro-batch-size", str(batch), "--global-batch-size", str(batch), "--train-iters",
                       str(self.args.speed_steps), *flags]
                what = f"K={k}, {impl} layers, bf16, {batch} x {seq} tokens ({seq // k} positions) per step"
                try:
                    steps = self.train(name, run)[2:]  # the first steps pay for allocation and kernel tuning
                except RunFailed as e:
                    self.row("speed", what, f"run failed: {e}", ok=False)
                    continue
                median = {key: sorted(s[key] for s in steps)[len(steps) // 2]
                          for key in ("tokens_per_sec", "tflops_per_device", "mfu")}
                median["flops_per_token"] = median["tflops_per_device"] * 1e12 / median["tokens_per_sec"]
                median["peak_memory_gb"] = max(s["peak_memory_bytes"] for s in steps) / 1e9
                measured[impl, k] = median
                self.row("speed", what, f"{median['tokens_per_sec']:,.0f} tokens/s, {median['tflops_per_device']:.3g}"
                         f" TFLOP/s, MFU {100 * median['mfu']:.1f}%, {self.memory} {median['peak_memory_gb']:.2f} GB")
            if (impl, 1) in measured and (impl, 4) in measured:
                one, four = measured[impl, 1], measured[impl, 4]
                self.row("speed", f"K=4 speed-up over K=1, {impl} layers",
                         f"{four['tokens_per_sec'] / one['tokens_per_sec']:.2f}x tokens/s (FLOP ratio "
                         f"{one['flops_per_token'] / four['flops_per_token']:.2f}x)")
        self.speed_results = {f"{impl}_K{k}": v for (impl, k), v in measured.items()}

    def plan(self) -> None:
        batch = 8 if self.smoke else 16
        # Phase 1 reads batch / K samples of K x the tokens: micro-batches of that size fit both phases.
        flags = [*self.small(4), "--patch-fraction", "0.5", "--save-interval", "5", "--micro-batch-size",
                 str(batch // 4)]
        straight = self.cached("plan_straight", [*flags, "--save", str(self.out / "runs" / "plan_straight")])
        stopped = [*flags, "--save", str(self.out / "runs" / "plan_resumed")]

        def resumed():
            self.train("plan_stopped", [*stopped, "--exit-interval", "7"], log_name="plan_resumed")
            return self.train("plan_resumed", stopped)

        self.compare("plan", "two-phase plan (K=4, lambda=1/2) stopped at step 7 and resumed, against straight "
                     "through, max abs. loss difference", [straight, resumed], self.args.max_loss_diff)

    def parallel(self) -> None:
        if not self.smoke and self.device_count < 2:
            self.row("parallel", "TP=2 and DP=2 against one device", f"{self.device_count} GPU", result="skipped")
            return
        for layout, flags in (("TP=2", ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
                              ("DP=2", [])):
            self.compare("parallel", f"K=4 fp32, {layout} against one device, max abs. loss difference",
                         [self.cached("K4_fp32", self.small(4)),
                          self.cached(f"K4_{layout}", self.small(4, flags), nproc=2)], self.args.max_loss_diff)

    # -- the report ------------------------------------------------------------------------------------------------
    def report(self, about: dict) -> None:
        lines = [f"# GPU check: {about['device']}", "",
                 ", ".join(f"{key} {value}" for key, value in about.items() if key != "device"), "",
                 "| step | check | measured | bound | result |", "|---|---|---|---|---|"]
        lines += [f"| {r['step']} | {r['check']} | {r['measured']} | {r['bound']} | {r['result']} |" for r in self.rows]
        lines += ["", "Each run's seconds (and peak memory): " + ", ".join(
            f"{name} {seconds} s" + (f" ({self.peak_memory[name]} GB)" if name in self.peak_memory else "")
            for name, seconds in self.timings.items())]
        (self.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
        record = {"about": about, "rows": self.rows, "seconds": self.timings, "peak_memory_gb": self.peak_memory,
                  "passed": not self.failed,
                  "speed": getattr(self, "speed_results", {})}
        (self.out / "gpu_check.json").write_text(json.dumps(record, indent=2) + "\n")
        print("\n".join(lines))
        print(f"gpu_check: {'all checks passed' if not self.failed else 'a check FAILED'}; the table is in "
              f"{self.out / 'gpu_check.md'} and {self.out / 'gpu_check.json'}")


def machine(args) -> dict:
    """What the check runs on (torch imported here only: --help works on a bare machine)."""
    from importlib.metadata import version

    import torch

    te = subprocess.run([sys.executable, "-c", "import transformer_engine.pytorch"], capture_output=True, text=True)
    args.te = te.returncode == 0 and not args.cpu_smoke
    args.te_missing = ("--cpu-smoke (GPU only)" if args.cpu_smoke else
                       f"transformer_engine does not import ({(te.stderr.strip().splitlines() or ['?'])[-1]})")
    about = {"device": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if torch.cuda.is_available()
             else "CPU (--cpu-smoke)", "torch": torch.__version__, "CUDA": torch.version.cuda,
             "megatron-core": version("megatron-core"), "Python": sys.version.split()[0],
             "Transformer Engine": version("transformer_engine") if args.te else "no"}
    if args.setup_seconds is not None:
        about["setup"] = f"{args.setup_seconds} s"
    return about, torch.cuda.device_count() if torch.cuda.is_available() else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu_check", help="directory for the table, the runs' logs and data")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="the same steps at tiny sizes on the CPU (MFU against the CPU's measured matmul peak)")
    parser.add_argument("--max-loss-diff", type=float, default=5e-3,
                        help="bound on fp32 loss differences: device vs CPU, resumed vs straight, TP/DP vs one device")
    parser.add_argument("--max-bf16-gap", type=float, default=0.1, help="bound on bf16 vs fp32 loss differences")
    parser.add_argument("--speed-steps", type=int, default=12, help="steps of each speed run (the first 2 not timed)")
    parser.add_argument("--run-timeout", type=float, default=300, help="seconds allowed to each training run")
    parser.add_argument("--only", nargs="+", choices=STEP_NAMES, help="run only these steps (default: all)")
    parser.add_argument("--setup-seconds", type=float, help="what setting up took (gpu_check.sh passes it)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check = Check(args)
    shutil.rmtree(check.out / "runs", ignore_errors=True)  # logs and checkpoints of an earlier check
    check.out.mkdir(parents=True, exist_ok=True)
    about, check.device_count = machine(args)
    if not args.cpu_smoke and not check.device_count:
        print("gpu_check.py: error: no CUDA device; --cpu-smoke runs the same steps on the CPU", file=sys.stderr)
        return 2
    check.device = "the CPU" if args.cpu_smoke else "the GPU"
    check.memory = "peak resident memory" if args.cpu_smoke else "peak allocated memory"
    started = time.time()
    try:
        check.prepare_data()
    except RunFailed as e:
        print(f"gpu_check.py: error: preparing the data: {e}", file=sys.stderr)
        return 1
    for name in args.only or STEP_NAMES:
        getattr(check, name)()
    about["check"] = f"{time.time() - started:.0f} s"
    check.report(about)
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
