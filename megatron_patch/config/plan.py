"""A two-phase plan from a token budget: how many iterations each phase runs, on which data, at what cost.

The user describes the token-level run they would have done (tokens per sample T = --seq-length, sequences per
step G = --global-batch-size, budget D = --train-tokens or N = --train-iters) plus K = --patch-size and
lambda = --patch-fraction. The plan keeps the tokens per optimizer step equal in both phases (the paper's
recipe) and turns that into two ordinary TrainingConfigs:

  phase 1 (patch):  K*T tokens = T patches per sample, G/K samples per step, round(lambda*N) iterations,
                    the first lambda of the training split's tokens, saved under {save}/phase1
  phase 2 (token):  T tokens per sample, G samples per step, the remaining iterations, the rest of the data,
                    initialised from phase 1's final weights (fresh optimizer and LR schedule), {save}/phase2

Cost relative to token-level training on the same tokens: lambda/K + 1 - lambda.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

from megatron_patch.checkpoint.layout import latest_iteration
from megatron_patch.config.deepspeed import resolve_deepspeed_config
from megatron_patch.config.schema import LR_REQUIRED, ConfigError, TrainingConfig, iterations_for_tokens

PHASE_NAMES = ("phase1", "phase2")
PER_PHASE_FLAGS = ("phase1_lr", "phase2_lr", "phase1_lr_warmup_iters", "phase2_lr_warmup_iters",
                   "phase1_decoupled_lr", "phase2_decoupled_lr")  # PlanConfig


@dataclass
class PhasePlan:
    name: str
    patch_size: int
    seq_length: int  # tokens read per sample
    global_batch_size: int  # samples per step
    train_iters: int
    lr: float
    lr_warmup_iters: float  # fractional from --lr-warmup-samples or --lr-warmup-fraction
    decoupled_lr: Optional[float]  # the embedding and output layer's peak LR (None: lr)
    train_data_range: tuple
    save: str
    pretrained_checkpoint: str = None

    @property
    def tokens(self) -> int:
        return self.train_iters * self.global_batch_size * self.seq_length


@dataclass
class TwoPhasePlan:
    patch_size: int
    requested_fraction: float
    tokens_per_step: int
    phases: List[PhasePlan]

    @property
    def total_iters(self) -> int:
        return sum(p.train_iters for p in self.phases)

    @property
    def patch_fraction(self) -> float:
        """lambda as planned: whole iterations, so it can differ slightly from the requested one."""
        return self.phases[0].train_iters / self.total_iters

    @property
    def cost(self) -> float:
        """Compute relative to token-level training on the same tokens: lambda/K + 1 - lambda."""
        return self.patch_fraction / self.patch_size + 1 - self.patch_fraction

    def describe(self) -> str:
        lines = [
            f"two-phase plan: {self.total_iters * self.tokens_per_step} tokens in {self.total_iters} iterations of "
            f"{self.tokens_per_step} tokens, K={self.patch_size}, lambda={self.patch_fraction:.4f} "
            f"(requested {self.requested_fraction})"
        ]
        for p in self.phases:
            kind = f"patch, K={p.patch_size}" if p.patch_size > 1 else "token"
            lines.append(
                f"  {p.name} ({kind}): {p.train_iters} iterations x {p.global_batch_size} samples x {p.seq_length} "
                f"tokens = {p.tokens} tokens; data [{p.train_data_range[0]:.4f}, {p.train_data_range[1]:.4f}) of "
                f"the training split; lr {p.lr:g}, warmup {p.lr_warmup_iters:g}"
                + (f", embedding and output layer lr {p.decoupled_lr:g}" if p.decoupled_lr is not None else "")
                + f"; save {p.save}"
                + (f"; weights from {p.pretrained_checkpoint}" if p.pretrained_checkpoint else "")
            )
        lines.append(f"  cost: lambda/K + 1 - lambda = {self.cost:.4f} of token-level training")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "patch_size": self.patch_size,
            "patch_fraction": self.patch_fraction,
            "requested_fraction": self.requested_fraction,
            "tokens_per_step": self.tokens_per_step,
            "total_iters": self.total_iters,
            "total_tokens": self.total_iters * self.tokens_per_step,
            "cost": self.cost,
            "phases": [dict(vars(p), tokens=p.tokens) for p in self.phases],
        }


def make_plan(cfg: TrainingConfig) -> TwoPhasePlan:
    """The plan for `cfg` (a token-level description with --patch-fraction set); raises ConfigError."""
    k, fraction = cfg.patch_size, cfg.plan.patch_fraction
    if fraction is None or not 0.0 < fraction < 1.0:
        raise ConfigError(f"--patch-fraction must be between 0 and 1 (exclusive), got {fraction}")
    if k < 2:
        raise ConfigError(f"--patch-fraction needs --patch-size K > 1 for phase 1, got {k}")
    if cfg.global_batch_size is None or cfg.global_batch_size % k:
        raise ConfigError(
            f"a two-phase plan needs --global-batch-size (phase 2's samples per step) divisible by --patch-size "
            f"{k}: phase 1 reads {k}x longer samples, {k}x fewer per step; got {cfg.global_batch_size}"
        )
    if not cfg.save:
        raise ConfigError("a two-phase plan needs --save (phase 2 starts from phase 1's checkpoint there)")
    if cfg.load or cfg.pretrained_checkpoint:
        raise ConfigError("a two-phase plan resumes from --save's phase directories: drop --load and "
                          "--pretrained-checkpoint")
    if cfg.optim.lr_decay_iters is not None or cfg.optim.lr_decay_samples is not None:
        raise ConfigError("a two-phase plan decays the LR over each phase's iterations: drop --lr-decay-iters/"
                          "--lr-decay-samples")
    cfg.schedule_in_iterations()  # samples of the token-level run described; each phase keeps its step count
    tokens_per_step = cfg.global_batch_size * cfg.seq_length
    if (cfg.train_iters is None) == (cfg.train_tokens is None):
        raise ConfigError("give exactly one of --train-iters, --train-tokens and --train-samples (the budget of "
                          "both phases)")
    total = cfg.train_iters if cfg.train_iters is not None else iterations_for_tokens(cfg.train_tokens, tokens_per_step)
    phase1_iters = round(fraction * total)
    if not 0 < phase1_iters < total:
        raise ConfigError(
            f"--patch-fraction {fraction} of {total} iterations leaves a phase with no iterations; "
            f"raise the budget or change the fraction"
        )
    boundary = phase1_iters / total
    save = [os.path.join(cfg.save, name) for name in PHASE_NAMES]
    lr = [_override(getattr(cfg.plan, f"phase{n}_lr"), cfg.optim.lr) for n in (1, 2)]
    if None in lr:
        raise ConfigError(LR_REQUIRED)
    iters = [phase1_iters, total - phase1_iters]
    fraction_warmup = cfg.optim.lr_warmup_fraction
    warmup = [_override(getattr(cfg.plan, f"phase{n}_lr_warmup_iters"),
                        cfg.optim.lr_warmup_iters if fraction_warmup is None else fraction_warmup * iters[n - 1])
              for n in (1, 2)]
    decoupled = [_override(getattr(cfg.plan, f"phase{n}_decoupled_lr"), cfg.optim.decoupled_lr) for n in (1, 2)]
    if cfg.optim.decoupled_min_lr is not None and decoupled == [None, None]:
        raise ConfigError("--decoupled-min-lr needs --decoupled-lr or a --phaseN-decoupled-lr")
    phases = [
        PhasePlan("phase1", k, k * cfg.seq_length, cfg.global_batch_size // k, iters[0], lr[0], warmup[0],
                  decoupled[0], (0.0, boundary), save[0]),
        PhasePlan("phase2", 1, cfg.seq_length, cfg.global_batch_size, iters[1], lr[1], warmup[1],
                  decoupled[1], (boundary, 1.0), save[1], pretrained_checkpoint=save[0]),
    ]
    for n, p in enumerate(phases, 1):
        own = f"--phase{n}-lr-warmup-iters" if getattr(cfg.plan, f"phase{n}_lr_warmup_iters") is not None \
            else "--lr-warmup-iters (per phase)"
        if p.lr_warmup_iters >= p.train_iters:
            raise ConfigError(f"{own} {p.lr_warmup_iters:g} must be smaller than {p.name}'s {p.train_iters} iterations")
        own = f"--phase{n}-lr" if getattr(cfg.plan, f"phase{n}_lr") is not None else "--lr"
        if p.lr < cfg.optim.min_lr:
            raise ConfigError(f"{own} {p.lr:g} is below --min-lr {cfg.optim.min_lr:g}, where the decay ends")
    return TwoPhasePlan(k, fraction, tokens_per_step, phases)


def _override(value, default):
    return default if value is None else value


def phase_config(cfg: TrainingConfig, phase: PhasePlan) -> TrainingConfig:
    """One phase of the plan as an ordinary single-phase TrainingConfig (resumable from its own --save)."""
    out = copy.deepcopy(cfg)
    out.plan.patch_fraction = None
    out.patch_size, out.seq_length = phase.patch_size, phase.seq_length
    out.global_batch_size, out.train_iters, out.train_tokens = phase.global_batch_size, phase.train_iters, None
    out.optim.lr, out.optim.lr_warmup_iters, out.optim.lr_warmup_fraction = phase.lr, phase.lr_warmup_iters, None
    out.optim.decoupled_lr = phase.decoupled_lr
    if phase.decoupled_lr is None:
        out.optim.decoupled_min_lr = None  # it went with another phase's --phaseN-decoupled-lr
    out.data.train_data_range = phase.train_data_range
    out.save = out.load = phase.save
    out.pretrained_checkpoint = phase.pretrained_checkpoint
    if cfg.log_json:
        stem, ext = os.path.splitext(cfg.log_json)
        out.log_json = f"{stem}.{phase.name}{ext}"
    return out


def phases_to_run(cfg: TrainingConfig, world_size: int) -> Tuple[List[TrainingConfig], Optional[TwoPhasePlan]]:
    """The resolved phase configs this command runs and the plan they come from (None for a single phase).
    Everything is checked here, before any process group starts; raises ConfigError."""
    if cfg.plan.patch_fraction is None:
        per_phase = [f for f in PER_PHASE_FLAGS if getattr(cfg.plan, f) is not None]
        if per_phase:
            raise ConfigError(f"--{per_phase[0].replace('_', '-')} sets a phase of a two-phase plan: give "
                              f"--patch-fraction, or --lr/--lr-warmup-iters for a single run")
        return [_resolve(cfg, world_size)], None
    plan = make_plan(cfg)
    return selected_phases(cfg, plan, world_size), plan


def _resolve(cfg: TrainingConfig, world_size: int) -> TrainingConfig:
    cfg.resolve(world_size)
    if cfg.deepspeed.enabled:
        cfg.deepspeed.resolved = resolve_deepspeed_config(cfg, cfg.data_parallel_size(world_size))
    return cfg


def selected_phases(cfg: TrainingConfig, plan: TwoPhasePlan, world_size: int) -> List[TrainingConfig]:
    """The phase configs this command runs (--phase), every one validated before any work. Running phase 2
    alone needs phase 1 finished; with both, phase 1 writes the checkpoint phase 2 starts from."""
    configs = [phase_config(cfg, p) for p in plan.phases]
    for config in configs:
        pretrained, config.pretrained_checkpoint = config.pretrained_checkpoint, None  # phase 1 may yet write it
        _resolve(config, world_size)
        config.pretrained_checkpoint = pretrained
    if cfg.plan.phase == "1":
        return configs[:1]
    if cfg.plan.phase == "2":
        phase1 = plan.phases[0]
        done = latest_iteration(phase1.save)
        if done != phase1.train_iters:
            raise ConfigError(f"--phase 2: phase 1 has not finished: {phase1.save} holds iteration {done} of "
                              f"{phase1.train_iters} (run --phase 1 first)")
        return configs[1:]
    return configs
