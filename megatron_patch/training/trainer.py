"""The training loop. One call of `pretrain(cfg)` runs one phase:

  phase 1: --patch-size K (K>1)            patch-level, from scratch (or resumed)
  phase 2: --patch-size 1 --pretrained-checkpoint PHASE1_SAVE
           token-level, initialised from phase 1's WEIGHTS only: fresh optimizer, fresh LR schedule

Both phases are the same code with a different TrainingConfig. megatron-core does the work: its DDP, its
optimizer (AdamW), its LR scheduler and its forward/backward schedules. `Trainer.train_step` is the one step
skeleton (forward/backward, divergence guard, optimizer step, schedule, counters); a trainer for another engine
(engine.DeepSpeedTrainer) fills its hooks: wrap, forward_backward, optimizer_step, save and resume.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.transformer.module import Float16Module

from megatron_patch.checkpoint import layout, reshard, storage
from megatron_patch.config.schema import TrainingConfig, padded_vocab_size, parse_blend, to_dict, token_level_view
from megatron_patch.config.tokenizer import TokenizerSpec
from megatron_patch.data.dataset import alignment_pad_id, build_datasets, dataset_sizes, micro_batches
from megatron_patch.data.tokenizers.wrappers import build_tokenizer
from megatron_patch.distributed import parallel
from megatron_patch.distributed.parallel import print_rank_0
from megatron_patch.distributed.step import global_losses, lr_scheduler, megatron_optimizer_config, run_schedule
from megatron_patch.method.flops import training_flops_per_sample
from megatron_patch.method.model import PatchGPTModel, build_model, transformer_config
from megatron_patch.training.json_log import JsonLinesLog
from megatron_patch.training.trackers import Trackers, peak_memory_bytes, peak_tflops


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm: the run stops without saving, the last good checkpoint stays."""


class Trainer:
    """Model, optimizer, schedule and data of one phase, on megatron-core's DDP and optimizer."""

    def __init__(self, cfg: TrainingConfig):
        self.cfg = cfg
        self.tokenizer = build_tokenizer(TokenizerSpec.of(cfg.data))
        self.vocab_size = padded_vocab_size(self.tokenizer.vocab_size, cfg.parallel.tensor_model_parallel_size)
        self.run_description = storage.describe_run(cfg, dataset_sizes(*parse_blend(cfg.data.data_path)))
        # One chunk per rank; with interleaved pipelining, one per virtual stage, sharing one config.
        self.config = transformer_config(cfg.model, cfg.parallel, cfg.bf16)
        vpp = cfg.parallel.virtual_pipeline_model_parallel_size
        models = [
            build_model(cfg.model, cfg.parallel, self.vocab_size, cfg.patch_size, config=self.config,
                        vp_stage=vp_stage if vpp else None,
                        tokenizer_vocab_size=self.tokenizer.vocab_size).to(parallel.device())
            for vp_stage in range(vpp or 1)
        ]
        # The compute axis (flops.py): tokens and model FLOPs since the start of the run, earlier phases included.
        self.flops_per_step = cfg.global_batch_size * training_flops_per_sample(
            cfg.model, cfg.seq_length, cfg.patch_size, padded_vocab_size(self.tokenizer.vocab_size, 1))
        self.compute = {"tokens": 0, "flops": 0}
        if layout.latest_iteration(cfg.load) is None and cfg.pretrained_checkpoint:
            # Before wrapping: gradient buffers, fp32 master copies and ZeRO partitions all start from these weights.
            self.load_pretrained_weights(models)
        self.wrap(models)
        self.iteration = 0
        self.consumed_samples = 0

    # -- hooks of another engine ---------------------------------------------------------------------------------
    def wrap(self, models: list) -> None:
        """megatron-core's DDP around each chunk, its optimizer and the LR schedule."""
        cfg, p = self.cfg, self.cfg.parallel
        self.chunks = []
        for vp_stage, chunk in enumerate(models):
            if cfg.bf16:
                chunk = Float16Module(chunk.config, chunk)
            self.chunks.append(DistributedDataParallel(
                self.config,
                DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=p.overlap_grad_reduce,
                                              use_distributed_optimizer=p.use_distributed_optimizer,
                                              overlap_param_gather=p.overlap_param_gather),
                chunk,
                disable_bucketing=vp_stage > 0,  # as Megatron-LM: one bucket per rank is enough off the first chunk
            ))
        # As Megatron-LM's training.py: the schedules call these per chunk (a list with several chunks).
        self.config.no_sync_func = _one_or_list([chunk.no_sync for chunk in self.chunks])
        if p.overlap_grad_reduce:
            self.config.grad_sync_func = _one_or_list([chunk.start_grad_sync for chunk in self.chunks])
        if p.overlap_param_gather:
            self.config.param_sync_func = _one_or_list([chunk.start_param_sync for chunk in self.chunks])
        self.config.finalize_model_grads_func = finalize_model_grads
        self.optimizer = get_megatron_optimizer(megatron_optimizer_config(cfg, self.config.params_dtype), self.chunks)
        self.scheduler = lr_scheduler(self.optimizer, cfg.optim)
        held = sum(param.numel() for group in self.optimizer.param_groups for param in group["params"])
        total = sum(param.numel() for model in self.models for param in model.parameters())
        print_rank_0(f"optimizer state (Adam moments{', fp32 master weights' if cfg.bf16 else ''}) on rank 0: "
                     f"{held:,} of this model-parallel rank's {total:,} parameters")

    def forward_backward(self, data_iterators):
        """Forward and backward of every micro-batch of one global batch: (loss, per-micro-batch losses)."""
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        return self.run_batches(data_iterators, self.num_microbatches, forward_only=False)

    def optimizer_step(self) -> Optional[float]:
        """Reduce, clip and apply the gradients; returns the gradient norm."""
        _, grad_norm, _ = self.optimizer.step()
        return grad_norm

    def save(self) -> None:
        """A checkpoint in --ckpt-format: torch_dist (every rank writes its shards) or the legacy per-rank files
        (with the distributed optimizer, its state gathered into distrib_optim.pt as Megatron-LM does)."""
        with self.weights_gathered():
            if self.cfg.ckpt_format == "torch_dist":
                path = storage.save_torch_dist(self.cfg.save, self.iteration, self.sharded_state_dict(),
                                                  self.run_record())
            else:
                path = storage.save_with(self.cfg.save, self.iteration, self.run_record(), self._write_legacy)
        print_rank_0(f"saved checkpoint {path}")

    def _write_legacy(self, staging: str) -> None:
        storage.write_shard(staging, self.state_dict())
        if self.cfg.parallel.use_distributed_optimizer:  # collective over data-parallel ranks; rank 0 writes
            self.optimizer.save_parameter_state(storage.shard_file(staging, storage.DISTRIB_OPTIM))

    def resume(self, iteration: int) -> None:
        """Model, optimizer and training state from --load's checkpoint at `iteration`, in either format; a
        torch_dist checkpoint loads into any layout (the RNG streams only into the one that wrote it)."""
        directory = layout.iteration_dir(self.cfg.load, iteration)
        torch_dist = reshard.is_torch_dist(directory)
        if torch_dist:
            saved = layout.read_run(self.cfg.load, iteration)["config"]["parallel"]
            same_layout = all(saved[k] == getattr(self.cfg.parallel, k) for k in storage.MODEL_PARALLEL_LAYOUT)
            state = storage.load_torch_dist(directory, self.sharded_state_dict(is_loading=True, rng=same_layout))
            if not same_layout:
                print_rank_0("resuming in another model-parallel layout: dropout RNG streams start afresh")
        else:
            state = storage.load(self.cfg.load, iteration)
        for i, model in enumerate(self.models):
            model.load_state_dict(state[storage.model_key(i, len(self.models))])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.cfg.parallel.use_distributed_optimizer and not torch_dist:
            with torch.no_grad():  # fp32 training: the optimizer's main weights are views of the model's
                self.optimizer.load_parameter_state(storage.shard_file(directory, storage.DISTRIB_OPTIM))
        self.restore_training_state(state)
        print_rank_0(f"resumed from {self.cfg.load} at iteration {self.iteration}")

    def _allocate_distributed_optimizer_state(self) -> None:
        """megatron-core 0.16's DistributedOptimizer reads Adam's step counter to describe its state for a load;
        with torch's Adam (no apex or Transformer Engine) the counter exists only after a first step. Its own
        helper takes a zero-gradient step; the load then overwrites every value that step touched."""
        for optimizer in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            if not optimizer.optimizer.state:
                optimizer._init_optimizer_states_with_dummy_values()

    @contextlib.contextmanager
    def weights_gathered(self):
        """With --overlap-param-gather the updated weights arrive during the next forward pass: gather them now
        (before a save or an evaluation) and keep the gathering hooks off meanwhile."""
        if not self.cfg.parallel.overlap_param_gather:
            yield
            return
        for chunk in self.chunks:
            chunk.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            for chunk in self.chunks:
                chunk.enable_forward_pre_hook()

    @property
    def models(self) -> list[PatchGPTModel]:
        """The PatchGPTModel chunks of this rank, unwrapped from DDP (and Float16Module)."""
        unwrapped = [chunk.module for chunk in self.chunks]
        return [m.module if isinstance(m, Float16Module) else m for m in unwrapped]

    # -- the step --------------------------------------------------------------------------------------------------
    def train_step(self, data_iterators) -> dict:
        loss, microbatch_losses = self.forward_backward(data_iterators)
        self._stop_if_diverged("loss", loss)  # before the update: the weights in memory stay the last good ones
        grad_norm = self.optimizer_step()
        self._stop_if_diverged("gradient norm", grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step(increment=1)
        self.iteration += 1
        self.consumed_samples += self.cfg.global_batch_size
        self.compute["tokens"] += self.cfg.tokens_per_step
        self.compute["flops"] += self.flops_per_step
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "microbatch_losses": microbatch_losses}

    def _stop_if_diverged(self, what: str, value: Optional[float]) -> None:
        if value is None or math.isfinite(value):
            return
        last = layout.latest_iteration(self.cfg.save)
        kept = (f"the last good checkpoint, {layout.iteration_dir(self.cfg.save, last)}, is kept (resume "
                f"from it with --load, e.g. with a lower --lr)") if last is not None else "no checkpoint was saved"
        raise TrainingDiverged(f"{what} is {value} at iteration {self.iteration + 1}; stopped without saving: {kept}")

    def run_batches(self, data_iterators, num_microbatches: int, forward_only: bool):
        """megatron-core's schedule over this rank's chunks: (loss, per-micro-batch losses) of the batches."""
        entries = run_schedule(self.chunks, data_iterators, num_microbatches, self.cfg.num_patches,
                               self.cfg.micro_batch_size, forward_only)
        return global_losses(entries, num_microbatches)

    @property
    def num_microbatches(self) -> int:
        dp = parallel_state.get_data_parallel_world_size()
        return self.cfg.global_batch_size // (self.cfg.micro_batch_size * dp)

    @torch.no_grad()
    def evaluate(self, dataset, view: Optional[TrainingConfig] = None) -> float:
        """Loss on the first --eval-iters global batches of `dataset`, read as `view` says (default: this phase;
        config.token_level_view: the same weights at K=1)."""
        view = view or self.cfg
        for model in self.models:
            model.patch_size = view.patch_size
            model.eval()
        dp = parallel_state.get_data_parallel_world_size()
        num_microbatches = view.global_batch_size // (view.micro_batch_size * dp) * view.eval_iters
        with self.weights_gathered():
            entries = run_schedule(self.chunks, self.data_iterators(dataset, 0, view.micro_batch_size),
                                   num_microbatches, view.num_patches, view.micro_batch_size, forward_only=True)
        for model in self.models:
            model.patch_size = self.cfg.patch_size
            model.train()
        return global_losses(entries, num_microbatches)[0]

    # -- weights and checkpoints -----------------------------------------------------------------------------------
    def load(self) -> None:
        """Resume from --load if it holds a checkpoint (weights from --pretrained-checkpoint were loaded before)."""
        iteration = layout.latest_iteration(self.cfg.load)
        if iteration is not None:
            self._check_compatible(self.cfg.load, iteration, resume=True)
            self.resume(iteration)

    def load_pretrained_weights(self, models: list) -> None:
        """Weights only from --pretrained-checkpoint's latest iteration, resharded from whatever layout wrote them."""
        root = self.cfg.pretrained_checkpoint
        iteration = layout.latest_iteration(root)
        self._check_compatible(root, iteration, resume=False)
        sharding = {k: v for m in models for k, v in reshard.sharding_of(m).items()}
        full = reshard.full_state_dict(layout.iteration_dir(root, iteration), sharding)
        for model in models:
            reshard.load_into(model, full)
        self.compute = dict((layout.read_run(root, iteration) or {}).get("compute", self.compute))
        print_rank_0(f"initialised weights from {root} (iteration {iteration}); fresh optimizer and LR schedule")

    def _check_compatible(self, root: str, iteration: int, resume: bool) -> None:
        saved = layout.read_run(root, iteration)
        flag = "--load" if resume else "--pretrained-checkpoint"
        if saved is not None:
            storage.check_compatible(saved, self.run_description, f"{flag} {root} (iteration {iteration})", resume)

    def training_state(self) -> dict:
        """Everything but the model and optimizer: the same in every checkpoint format."""
        return {
            "opt_param_scheduler": self.scheduler.state_dict(),
            "iteration": self.iteration,
            "consumed_samples": self.consumed_samples,
            "config": to_dict(self.cfg),
            "rng_state": parallel.rng_states(),
            "compute": dict(self.compute),
        }

    def restore_training_state(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["opt_param_scheduler"])
        self.iteration, self.consumed_samples = state["iteration"], state["consumed_samples"]
        if "rng_state" in state:
            parallel.set_rng_states(state["rng_state"])
        # Checkpoints from before the compute axis: this phase's own steps.
        self.compute = dict(state.get("compute") or {"tokens": self.iteration * self.cfg.tokens_per_step,
                                                     "flops": self.iteration * self.flops_per_step})

    def run_record(self) -> dict:
        """run.json of a checkpoint: what the run trained on (resume guards) and the compute spent up to it (the
        next phase's compute axis starts there)."""
        return {**self.run_description, "compute": dict(self.compute)}

    def state_dict(self) -> dict:
        return {
            **{storage.model_key(i, len(self.models)): m.state_dict() for i, m in enumerate(self.models)},
            "optimizer": self.optimizer.state_dict(),
            **self.training_state(),
        }

    def sharded_state_dict(self, is_loading: bool = False, rng: bool = True) -> dict:
        """What a torch_dist checkpoint holds: megatron-core's sharded model and optimizer state (global tensors,
        so any layout can load them), this rank's RNG streams as a per-(pipeline, tensor) rank object, and the
        training state, the same on every rank."""
        models = {storage.model_key(i, len(self.models)): m.sharded_state_dict() for i, m in enumerate(self.models)}
        state = {**models, **self.training_state()}
        if is_loading and self.cfg.parallel.use_distributed_optimizer:
            self._allocate_distributed_optimizer_state()
        state["optimizer"] = self.optimizer.sharded_state_dict(models, is_loading=is_loading,
                                                               metadata=storage.OPTIMIZER_SHARDING)
        rng_states = state.pop("rng_state")
        if rng:
            state["rng_state"] = storage.rng_object(rng_states)
        return state

    # -- data ------------------------------------------------------------------------------------------------------
    def build_datasets(self):
        """(train, validation) PatchGPTDatasets; validation is None when --split gives it nothing."""
        train, valid, _ = datasets_for(self.cfg, self.tokenizer)
        return train, valid

    def data_iterators(self, dataset, consumed_samples: int, micro_batch_size: Optional[int] = None) -> list:
        """One iterator per model chunk over the same samples: each chunk of an interleaved pipeline reads
        every micro-batch (the first stage for tokens, the last for labels)."""
        cfg = self.cfg
        return [micro_batches(dataset, consumed_samples, micro_batch_size or cfg.micro_batch_size,
                              parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
                              cfg.data.num_workers, cfg.seed)
                for _ in self.chunks]


def _one_or_list(funcs: list):
    return funcs if len(funcs) > 1 else funcs[0]


def datasets_for(cfg: TrainingConfig, tokenizer, samples: Optional[list] = None):
    """The (train, valid, test) PatchGPTDatasets a run of `cfg` reads (None where a split is empty); `samples`:
    other sample counts than the run's."""
    prefixes, weights = parse_blend(cfg.data.data_path)
    train, valid, test = build_datasets(
        prefixes, weights, cfg.data.split, tokenizer, cfg.patch_size, cfg.num_patches, samples or num_samples(cfg),
        cfg.seed, alignment_pad_id(prefixes, tokenizer), cfg.data.data_cache_path, lambda: True,
        cfg.data.train_data_range,
    )
    return train, valid, test


def num_samples(cfg: TrainingConfig) -> list:
    """Samples of the train, validation and test datasets a run builds (the validation samples depend on it)."""
    evals = cfg.train_iters // cfg.eval_interval + 1
    return [
        cfg.train_iters * cfg.global_batch_size,
        evals * cfg.eval_iters * cfg.global_batch_size,
        0,  # the test split is never read during training
    ]


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


class PhaseLog:
    """What a phase reports: a log line every --log-interval steps, a --log-json record per step and per validation
    (rank 0), TensorBoard/W&B scalars, and the summary at the end. Every record carries the run's compute axis."""

    def __init__(self, trainer: "Trainer", json_log: Optional[JsonLinesLog], trackers: Trackers):
        self.trainer, self.cfg, self.json_log, self.trackers = trainer, trainer.cfg, json_log, trackers
        self.start_iteration = trainer.iteration
        self.window, self.losses, self.step_times = [], [], []
        self.valid_losses = {}
        self.peak, self.peak_source = peak_tflops(self.cfg.tracking.peak_tflops)
        print_rank_0(f"MFU against a peak of {self.peak:.2f} TFLOP/s per device ({self.peak_source})")

    def _axis(self) -> dict:
        return {"patch_size": self.cfg.patch_size, "cumulative_tokens": self.trainer.compute["tokens"],
                "cumulative_flops": self.trainer.compute["flops"]}

    def step(self, stats: dict, seconds: float) -> None:
        cfg, tracking = self.cfg, self.cfg.tracking
        self.step_times.append(seconds)
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
            print_rank_0(f"iteration {iteration:6d}/{cfg.train_iters} | loss {sum(self.window) / len(self.window):.4f}"
                         f" | lr {stats['lr']:.3e} | grad norm {stats['grad_norm']:.3f}"
                         f" | tokens/s {stats['tokens_per_sec']:.0f} | {1000 * seconds:.0f} ms/iter{throughput}")
            self.window = []
        if self.json_log:
            self.json_log.write(stats)
        scalars = {"train/loss": stats["loss"], "train/lr": stats["lr"], "train/patch_size": cfg.patch_size,
                   "throughput/tokens_per_sec": stats["tokens_per_sec"], "throughput/tflops_per_device": tflops,
                   "throughput/mfu": stats["mfu"], "compute/cumulative_flops": stats["cumulative_flops"],
                   "train/iteration": iteration}
        if stats["grad_norm"] is not None:
            scalars["train/grad_norm"] = stats["grad_norm"]
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
            # Where the phase stands (a run stopped early by a signal resumes from here with --load).
            "iteration": iteration,
            "train_iters": cfg.train_iters,
            **self._axis(),
        }
        print_rank_0("phase summary: " + json.dumps(summary))
        if self.json_log:
            self.json_log.write({"summary": summary})
        return summary


def _mean(values):
    return sum(values) / len(values) if values else None


def pretrain(cfg: TrainingConfig, trainer_class=Trainer) -> dict:
    """Run one phase with a trainer of `trainer_class`; returns its summary (also printed and logged)."""
    parallel.seed_everything(cfg.seed)  # a phase run after another starts exactly as if run alone
    trainer = trainer_class(cfg)
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
    writes_log = cfg.log_json and parallel.is_rank_0()
    with JsonLinesLog(cfg.log_json) if writes_log else contextlib.nullcontext() as json_log, \
            Trackers(cfg.tracking, to_dict(cfg), f"K={cfg.patch_size}") as trackers:
        phase_log = PhaseLog(trainer, json_log, trackers)
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
        if validation and trainer.iteration % cfg.eval_interval == 0:
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
