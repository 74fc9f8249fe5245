"""What a phase reports while it runs: log lines, --log-json records, TensorBoard/W&B scalars, the summary."""

from __future__ import annotations

import json
import math
from typing import Optional

import torch.distributed as dist

from megatron_patch.distributed.parallel import print_rank_0
from megatron_patch.training.json_log import JsonLinesLog
from megatron_patch.training.trackers import Trackers, peak_memory_bytes, peak_tflops


class PhaseLog:
    """What a phase reports: a log line every --log-interval steps, a --log-json record per step and per validation
    (rank 0), TensorBoard/W&B scalars, and the summary at the end. Every record carries the run's compute axis."""

    # Phase 1 ending less than this far below the unigram entropy has learned little beyond token frequencies.
    PLATEAU_MARGIN = 0.05  # nats

    def __init__(self, trainer, json_log: Optional[JsonLinesLog], trackers: Trackers,
                 unigram_entropy: Optional[float] = None):
        self.trainer, self.cfg, self.json_log, self.trackers = trainer, trainer.cfg, json_log, trackers
        self.unigram_entropy = unigram_entropy  # a patch-level phase's context-free bound (data/unigram.py)
        self.start_iteration = trainer.iteration
        self.window, self.losses, self.step_times = [], [], []
        self.skipped_in_window = self.skipped = 0  # --fp16: steps skipped on a gradient overflow
        self.valid_losses = {}
        self.peak, self.peak_source = peak_tflops(self.cfg.tracking.peak_tflops)
        print_rank_0(f"MFU against a peak of {self.peak:.2f} TFLOP/s per device ({self.peak_source})")

    def _axis(self) -> dict:
        return {"patch_size": self.cfg.patch_size, "cumulative_tokens": self.trainer.compute["tokens"],
                "cumulative_flops": self.trainer.compute["flops"]}

    def step(self, stats: dict, seconds: float) -> None:
        cfg, tracking = self.cfg, self.cfg.tracking
        self.step_times.append(seconds)
        if stats.get("skipped"):  # as Megatron-LM: a skipped step's loss is left out of the averages
            self.skipped_in_window += 1
            self.skipped += 1
        else:
            self.window.append(stats["loss"])
            self.losses.append(stats["loss"])
        tflops = self.trainer.flops_per_step / seconds / dist.get_world_size() / 1e12
        stats.update(tokens_per_sec=cfg.tokens_per_step / seconds,
                     consumed_tokens=self.trainer.consumed_samples * cfg.seq_length,
                     tflops_per_device=tflops, mfu=tflops / self.peak, peak_memory_bytes=peak_memory_bytes(),
                     **self._axis())
        iteration = stats["iteration"]
        if iteration % cfg.log_interval == 0 or iteration == cfg.train_iters:
            throughput = (f" | TFLOP/s/device {tflops:.3f} | MFU {100 * stats['mfu']:.1f}%"
                          if tracking.log_throughput else "")
            loss = f"{_mean(self.window):.4f}" if self.window else "-"
            grad_norm = "-" if stats["grad_norm"] is None else f"{stats['grad_norm']:.3f}"
            scaling = (f" | loss scale {stats['loss_scale']:g} | skipped iterations {self.skipped_in_window}"
                       if "loss_scale" in stats else "")
            print_rank_0(f"iteration {iteration:6d}/{cfg.train_iters} | loss {loss} | lr {stats['lr']:.3e} | grad "
                         f"norm {grad_norm}{scaling} | tokens/s {stats['tokens_per_sec']:.0f} | "
                         f"{1000 * seconds:.0f} ms/iter{throughput}")
            self.window, self.skipped_in_window = [], 0
        if self.json_log:
            self.json_log.write(stats)
        scalars = {"train/loss": stats["loss"], "train/lr": stats["lr"], "train/patch_size": cfg.patch_size,
                   "throughput/tokens_per_sec": stats["tokens_per_sec"], "throughput/tflops_per_device": tflops,
                   "throughput/mfu": stats["mfu"], "compute/cumulative_flops": stats["cumulative_flops"],
                   "train/iteration": iteration}
        if stats["grad_norm"] is not None:
            scalars["train/grad_norm"] = stats["grad_norm"]
        if "loss_scale" in stats:
            scalars["train/loss_scale"] = stats["loss_scale"]
        if tracking.log_memory_to_tensorboard:
            scalars["memory/peak_bytes"] = stats["peak_memory_bytes"]
        self.trackers.log(scalars, stats["cumulative_tokens"])

    def validation(self, losses: dict) -> None:
        """losses: "valid_loss" (this phase's objective) and "token_level_valid_loss" (K=1)."""
        self.valid_losses = losses
        print_rank_0(f"iteration {self.trainer.iteration:6d} | " + " | ".join(
            f"{name.replace('_', ' ')} {value:.4f} (ppl {math.exp(min(value, 50)):.2f})"
            for name, value in losses.items()))
        if self.json_log:
            self.json_log.write({"eval": dict(losses, iteration=self.trainer.iteration, **self._axis())})
        scalars = {f"valid/{name}": value for name, value in losses.items()}
        if self.cfg.tracking.log_validation_ppl_to_tensorboard:
            scalars.update({f"valid/{name.replace('loss', 'ppl')}": math.exp(min(value, 50))
                            for name, value in losses.items()})
        self.trackers.log(scalars, self.trainer.compute["tokens"])

    def summary(self) -> dict:
        cfg, iteration = self.cfg, self.trainer.iteration
        # The first step pays for warm-up (allocation, caches): leave it out of the throughput when possible.
        timed = self.step_times[1:] or self.step_times
        quarter = max(1, len(self.losses) // 4)  # mean over a few steps at each end: single-step losses are noisy
        summary = {
            "patch_size": cfg.patch_size,
            "iterations": iteration - self.start_iteration,
            "tokens": (iteration - self.start_iteration) * cfg.tokens_per_step,
            "tokens_per_sec": len(timed) * cfg.tokens_per_step / sum(timed) if timed else 0.0,
            "seconds": sum(self.step_times),
            "first_train_loss": _mean(self.losses[:quarter]),
            "final_train_loss": _mean(self.losses[-quarter:]),
            "valid_loss": self.valid_losses.get("valid_loss"),
            "token_level_valid_loss": self.valid_losses.get("token_level_valid_loss"),
            "skipped_iterations": self.skipped,
            "unigram_entropy": self.unigram_entropy,
            # Where the phase stands (a run stopped early by a signal resumes from here with --load).
            "iteration": iteration,
            "train_iters": cfg.train_iters,
            **self._axis(),
        }
        self._say_plateau(summary)
        print_rank_0("phase summary: " + json.dumps(summary))
        if self.json_log:
            self.json_log.write({"summary": summary})
        return summary


    def _say_plateau(self, summary: dict) -> None:
        """How far below the context-free bound the phase ended (its validation loss, else its last train losses)."""
        bound = self.unigram_entropy
        which = "validation" if summary["valid_loss"] is not None else "train"
        loss = summary["valid_loss"] if which == "validation" else summary["final_train_loss"]
        if bound is None or loss is None:
            return
        where = "below" if loss <= bound else "ABOVE"
        print_rank_0(f"K={self.cfg.patch_size} phase ended {abs(bound - loss):.4f} nats {where} the unigram entropy "
                     f"({which} loss {loss:.4f}, unigram entropy {bound:.4f})")
        if bound - loss < self.PLATEAU_MARGIN:
            learned = ("not even the token frequencies" if loss > bound else
                       f"little beyond token frequencies (less than {self.PLATEAU_MARGIN} nats below them)")
            print_rank_0(f"warning: this phase learned {learned}, so the next starts from little more than a "
                         f"frequency table; a higher LR for the embedding and output layer can help "
                         f"(--phase1-decoupled-lr; README, \"Choosing K and lambda\")")


def _mean(values):
    return sum(values) / len(values) if values else None
