"""The training loop. One call of `pretrain(cfg)` runs one phase:

  phase 1: --patch-size K (K>1)            patch-level, from scratch (or resumed)
  phase 2: --patch-size 1 --pretrained-checkpoint PHASE1_SAVE
           token-level, initialised from phase 1's WEIGHTS only: fresh optimizer, fresh LR schedule

Both phases are the same code with a different TrainingConfig; the engine (megatron-core's or DeepSpeed's) is the
only thing that differs between backends.
"""

from __future__ import annotations

import contextlib
import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_patch.checkpoint import layout
from megatron_patch.config.schema import TrainingConfig, to_dict, token_level_view
from megatron_patch.data.dataset import datasets_for
from megatron_patch.distributed import parallel
from megatron_patch.distributed.parallel import print_rank_0
from megatron_patch.training.engine import MegatronEngine
from megatron_patch.training.json_log import JsonLinesLog
from megatron_patch.training.phase_log import PhaseLog
from megatron_patch.training.trackers import Trackers
from megatron_patch.training.trainer import Trainer


class EarlyExit:
    """--exit-signal-handler, --exit-interval, --exit-duration-in-mins. Checked after every step; all ranks agree
    (a signal may reach only some of them), so every rank leaves the loop after the same step."""

    REASONS = ("", "received {signal}", "--exit-interval {cfg.exit_interval}",
               "--exit-duration-in-mins {cfg.exit_duration_in_mins}")

    def __init__(self, cfg: TrainingConfig):
        self.cfg, self.started, self.signal = cfg, time.time(), None
        if cfg.exit_signal_handler:
            for signum in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def reason(self, iteration: int) -> Optional[str]:
        cfg = self.cfg
        code = max(
            1 if self.signal else 0,
            2 if cfg.exit_interval and iteration % cfg.exit_interval == 0 else 0,
            3 if cfg.exit_duration_in_mins and time.time() - self.started > 60 * cfg.exit_duration_in_mins else 0,
        )
        agreed = torch.tensor([code], device=parallel.device())
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        code = int(agreed.item())
        return self.REASONS[code].format(signal=self.signal or "a signal", cfg=cfg) if code else None


def pretrain(cfg: TrainingConfig, engine_class=MegatronEngine) -> dict:
    """Run one phase on an engine of `engine_class`; returns its summary (also printed and logged)."""
    parallel.seed_everything(cfg.seed)  # a phase run after another starts exactly as if run alone
    trainer = Trainer(cfg, engine_class)
    trainer.load()
    train_ds, valid_ds = trainer.build_datasets()
    # A patch-level phase is also validated at token level: its weights at K=1 on the samples phase 2 reads.
    token_view = token_level_view(cfg) if cfg.patch_size > 1 and valid_ds is not None else None
    validation = [("valid_loss", valid_ds, None)]
    if token_view:
        validation.append(("token_level_valid_loss", datasets_for(token_view, trainer.tokenizer)[1], token_view))
    elif valid_ds is not None:
        validation.append(("token_level_valid_loss", valid_ds, None))
    print_rank_0(f"phase: patch size K={cfg.patch_size}, {cfg.seq_length} tokens = {cfg.num_patches} positions per "
                 f"sample, {cfg.global_batch_size} samples = {cfg.tokens_per_step} tokens per step, "
                 f"{cfg.train_iters} iterations, world size {dist.get_world_size()}")
    # The plateau gauge (data/unigram.py), said by rank 0: a patch-level loss near it has learned token frequencies.
    unigram = trainer.context_free_bound() if cfg.patch_size > 1 and parallel.is_rank_0() else None
    if unigram is not None:
        print_rank_0(f"unigram entropy of the training data: {unigram:.4f} nats, the loss of a predictor that ignores "
                     f"the context on the K-target objective (phase 1 should end clearly below it)")
    writes_log = cfg.log_json and parallel.is_rank_0()
    with JsonLinesLog(cfg.log_json) if writes_log else contextlib.nullcontext() as json_log, \
            Trackers(cfg.tracking, to_dict(cfg), f"K={cfg.patch_size}") as trackers:
        phase_log = PhaseLog(trainer, json_log, trackers, unigram)
        _train(trainer, train_ds, validation if valid_ds is not None else [], phase_log)
        return phase_log.summary()


def _validate(trainer: Trainer, validation: list, phase_log: PhaseLog) -> None:
    """Each (name, dataset, view) of the phase's validation; a token-level phase's two names share one pass."""
    losses = {}
    for name, dataset, view in validation:
        if view is None and losses:
            losses[name] = next(iter(losses.values()))
        else:
            losses[name] = trainer.evaluate(dataset, view)
    phase_log.validation(losses)


def _train(trainer: Trainer, train_ds, validation: list, phase_log: PhaseLog) -> None:
    """Steps until the phase's last iteration or an early exit, validating and saving on schedule; then the final
    checkpoint and, unless just done, a last validation."""
    cfg = trainer.cfg
    data = trainer.data_iterators(train_ds, trainer.consumed_samples)
    early_exit = EarlyExit(cfg)
    validated_at = None
    while trainer.iteration < cfg.train_iters:
        started = time.perf_counter()
        stats = trainer.train_step(data)
        stats["iteration"] = trainer.iteration
        phase_log.step(stats, time.perf_counter() - started)
        if validation and cfg.eval_interval and trainer.iteration % cfg.eval_interval == 0:
            _validate(trainer, validation, phase_log)
            validated_at = trainer.iteration
        if cfg.save and cfg.save_interval and trainer.iteration % cfg.save_interval == 0:
            trainer.save()
        reason = early_exit.reason(trainer.iteration)
        if reason and trainer.iteration < cfg.train_iters:
            print_rank_0(f"stopping after iteration {trainer.iteration}: {reason}")
            break
    if cfg.save and layout.latest_iteration(cfg.save) != trainer.iteration:
        trainer.save()
    if validation and validated_at != trainer.iteration:
        _validate(trainer, validation, phase_log)
