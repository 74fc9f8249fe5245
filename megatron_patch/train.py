"""The training loop. One call of `pretrain(cfg)` runs one phase:

  phase 1: --patch-size K (K>1)            patch-level, from scratch (or resumed)
  phase 2: --patch-size 1 --pretrained-checkpoint PHASE1_SAVE
           token-level, initialised from phase 1's WEIGHTS only: fresh optimizer, fresh LR schedule

Both phases are the same code with a different TrainingConfig. megatron-core does the work: its DDP, its
optimizer (AdamW), its LR scheduler and its forward/backward schedules.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from megatron_patch import checkpoint, parallel, plan, reshard
from megatron_patch.config import ConfigError, TrainingConfig, parse_args, parse_blend, to_dict
from megatron_patch.data.dataset import DataError, build_datasets
from megatron_patch.data.indexed import read_sidecar
from megatron_patch.data.tokenizer import SentencePieceTokenizer
from megatron_patch.model import PatchGPTModel, build_model, transformer_config

VOCAB_DIVISIBLE_BY = 128  # Megatron-LM's --make-vocab-size-divisible-by default


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int) -> int:
    multiple = VOCAB_DIVISIBLE_BY * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm: the run stops without saving, the last good checkpoint stays."""


def dataset_sizes(data_path) -> list:
    """Fingerprint of the --data-path blend: weight, documents and tokens of each dataset."""
    prefixes, weights = parse_blend(data_path)
    sizes = []
    for i, prefix in enumerate(prefixes):
        dataset = IndexedDataset(prefix)  # keep it alive: its lengths are a view of its memory map
        lengths = dataset.sequence_lengths
        sizes.append({"weight": weights[i] if weights else None, "documents": int(lengths.size),
                      "tokens": int(lengths.sum(dtype="int64"))})
    return sizes


def alignment_pad_id(prefixes, tokenizer) -> int:
    """The id preprocessing padded documents with (their sidecars; the tokenizer's pad id for datasets without
    one): labels equal to it get no loss. Datasets of one blend must agree."""
    sidecars = [read_sidecar(prefix) for prefix in prefixes]
    ids = {s["pad_id"] for s in sidecars if s and s.get("patch_size", 1) > 1}
    if len(ids) > 1:
        raise DataError(f"--data-path: the datasets were padded with different pad ids {sorted(ids)}; "
                        f"preprocess them with one --pad-id")
    return ids.pop() if ids else tokenizer.pad


def log(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


class MicroBatchSampler:
    """Megatron's pretraining sampler: samples in order from `consumed_samples`; each round of
    micro_batch_size * DP samples is split across the data-parallel ranks."""

    def __init__(self, total_samples, consumed_samples, micro_batch_size, dp_rank, dp_size):
        self.total, self.consumed = total_samples, consumed_samples
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def __iter__(self):
        round_size = self.micro_batch_size * self.dp_size
        start = self.dp_rank * self.micro_batch_size
        for first in range(self.consumed, self.total - round_size + 1, round_size):
            yield list(range(first + start, first + start + self.micro_batch_size))


def _loader(dataset, consumed_samples, cfg: TrainingConfig):
    sampler = MicroBatchSampler(
        len(dataset),
        consumed_samples,
        cfg.micro_batch_size,
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
    )
    return iter(
        torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available(),
            # Its own generator: a new iterator draws a seed, which from the global one would shift the dropout
            # stream of a resumed run (its iterators are made at another point of that stream).
            generator=torch.Generator().manual_seed(cfg.seed),
        )
    )


def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Masked sum and token count: the schedule divides by the count, logging sums both over ranks."""
    loss_mask = loss_mask.view(-1).float()
    total = torch.sum(per_token_loss.reshape(-1).float() * loss_mask)
    num_tokens = loss_mask.sum().to(torch.int)
    return total, num_tokens, {"lm loss": torch.stack([total.detach(), loss_mask.sum()])}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    device = parallel.device()
    tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
    per_token_loss = model(tokens, None, None, labels=labels)
    return per_token_loss, partial(_loss_func, batch["loss_mask"].to(device))


def megatron_optimizer_config(cfg: TrainingConfig, params_dtype) -> MegatronOptimizerConfig:
    o = cfg.optim
    return MegatronOptimizerConfig(
        optimizer="adam",  # megatron-core's Adam applies decoupled weight decay: AdamW
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=cfg.bf16,
        params_dtype=params_dtype,
    )


def lr_scheduler(optimizer, o) -> OptimizerParamScheduler:
    """Megatron's LR (and weight-decay) schedule over any optimizer's param_groups; each phase starts a new one."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.lr_warmup_iters,
        lr_decay_steps=o.lr_decay_iters,
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=o.lr_decay_iters,
        wd_incr_style="constant",
    )


class Trainer:
    """Model, optimizer, schedule and data of one phase."""

    def __init__(self, cfg: TrainingConfig):
        self.cfg = cfg
        tp = cfg.parallel.tensor_model_parallel_size
        self.tokenizer = SentencePieceTokenizer(cfg.data.tokenizer_model)
        self.vocab_size = padded_vocab_size(self.tokenizer.vocab_size, tp)
        self.run_description = checkpoint.describe_run(cfg, dataset_sizes(cfg.data.data_path))
        # One chunk per rank; with interleaved pipelining, one per virtual stage, sharing one config.
        self.config = transformer_config(cfg.model, cfg.parallel, cfg.bf16)
        vpp = cfg.parallel.virtual_pipeline_model_parallel_size
        models = [
            build_model(cfg.model, cfg.parallel, self.vocab_size, cfg.patch_size, config=self.config,
                        vp_stage=vp_stage if vpp else None).to(parallel.device())
            for vp_stage in range(vpp or 1)
        ]
        self._wrap(models)
        self.iteration = 0
        self.consumed_samples = 0

    def _wrap(self, models: list) -> None:
        """megatron-core's DDP around each chunk, its optimizer and the LR schedule (DeepSpeedTrainer: an engine)."""
        cfg = self.cfg
        self.chunks = []
        for vp_stage, chunk in enumerate(models):
            if cfg.bf16:
                chunk = Float16Module(chunk.config, chunk)
            self.chunks.append(DistributedDataParallel(
                self.config,
                DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False),
                chunk,
                disable_bucketing=vp_stage > 0,  # as Megatron-LM: one bucket per rank is enough off the first chunk
            ))
        no_sync = [chunk.no_sync for chunk in self.chunks]
        self.config.no_sync_func = no_sync if len(no_sync) > 1 else no_sync[0]
        self.config.finalize_model_grads_func = finalize_model_grads
        self.optimizer = get_megatron_optimizer(megatron_optimizer_config(cfg, self.config.params_dtype), self.chunks)
        self.scheduler = lr_scheduler(self.optimizer, cfg.optim)

    @property
    def models(self) -> list[PatchGPTModel]:
        """The PatchGPTModel chunks of this rank, unwrapped from DDP (and Float16Module)."""
        unwrapped = [chunk.module for chunk in self.chunks]
        return [m.module if isinstance(m, Float16Module) else m for m in unwrapped]

    # -- checkpoints ---------------------------------------------------------------------------------------
    def training_state(self) -> dict:
        """Everything but the model and optimizer: the same in every checkpoint format."""
        return {
            "opt_param_scheduler": self.scheduler.state_dict(),
            "iteration": self.iteration,
            "consumed_samples": self.consumed_samples,
            "config": to_dict(self.cfg),
            "rng_state": parallel.rng_states(),
        }

    def restore_training_state(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["opt_param_scheduler"])
        self.iteration, self.consumed_samples = state["iteration"], state["consumed_samples"]
        parallel.set_rng_states(state["rng_state"])

    def state_dict(self) -> dict:
        return {
            **{_model_key(i, len(self.models)): m.state_dict() for i, m in enumerate(self.models)},
            "optimizer": self.optimizer.state_dict(),
            **self.training_state(),
        }

    def load(self) -> None:
        """Resume from --load if it holds a checkpoint; else take weights only from --pretrained-checkpoint."""
        resume_at = checkpoint.latest_iteration(self.cfg.load)
        if resume_at is not None:
            self._check_compatible(self.cfg.load, resume_at, resume=True)
            state = checkpoint.load(self.cfg.load, resume_at)
            self._load_models(state)
            self.optimizer.load_state_dict(state["optimizer"])
            self.restore_training_state(state)
            log(f"resumed from {self.cfg.load} at iteration {self.iteration}")
        elif self.cfg.pretrained_checkpoint:
            self._load_pretrained_weights(self.models)
            # The optimizer may keep its own (fp32 master) copy of the parameters: refresh it from the model.
            self.optimizer.reload_model_params()

    def _load_pretrained_weights(self, models: list) -> None:
        """Weights only from --pretrained-checkpoint's latest iteration, resharded from whatever layout wrote them."""
        root = self.cfg.pretrained_checkpoint
        iteration = checkpoint.latest_iteration(root)
        self._check_compatible(root, iteration, resume=False)
        sharding = {k: v for m in models for k, v in reshard.sharding_of(m).items()}
        full = reshard.full_state_dict(checkpoint.iteration_dir(root, iteration), sharding)
        for model in models:
            reshard.load_into(model, full)
        log(f"initialised weights from {root} (iteration {iteration}); fresh optimizer and LR schedule")

    def _check_compatible(self, root: str, iteration: int, resume: bool) -> None:
        saved = checkpoint.read_run(root, iteration)
        flag = "--load" if resume else "--pretrained-checkpoint"
        if saved is not None:
            checkpoint.check_compatible(saved, self.run_description, f"{flag} {root} (iteration {iteration})", resume)

    def _load_models(self, state: dict) -> None:
        for i, model in enumerate(self.models):
            model.load_state_dict(state[_model_key(i, len(self.models))])

    def save(self) -> None:
        path = checkpoint.save(self.cfg.save, self.iteration, self.state_dict(), self.run_description)
        log(f"saved checkpoint {path}")

    # -- steps -----------------------------------------------------------------------------------------------
    def _run_batches(self, data_iterators, num_microbatches: int, forward_only: bool):
        losses = get_forward_backward_func()(
            forward_step_func=_forward_step,
            data_iterator=data_iterators if len(data_iterators) > 1 else data_iterators[0],
            model=self.chunks,
            num_microbatches=num_microbatches,
            seq_length=self.cfg.num_patches,
            micro_batch_size=self.cfg.micro_batch_size,
            forward_only=forward_only,
        )
        return global_losses([entry["lm loss"] for entry in losses], num_microbatches)

    @property
    def num_microbatches(self) -> int:
        dp = parallel_state.get_data_parallel_world_size()
        return self.cfg.global_batch_size // (self.cfg.micro_batch_size * dp)

    def build_datasets(self):
        """(train, validation) PatchGPTDatasets; validation is None when --split gives it nothing."""
        cfg = self.cfg
        prefixes, weights = parse_blend(cfg.data.data_path)
        pad_id = alignment_pad_id(prefixes, self.tokenizer)
        train, valid, _ = build_datasets(
            prefixes, weights, cfg.data.split, self.tokenizer, cfg.patch_size, cfg.num_patches,
            _num_samples(cfg), cfg.seed, pad_id, cfg.data.data_cache_path, lambda: True, cfg.data.train_data_range,
        )
        return train, valid

    def data_iterators(self, dataset, consumed_samples: int) -> list:
        """One iterator per model chunk over the same samples: each chunk of an interleaved pipeline reads
        every micro-batch (the first stage for tokens, the last for labels)."""
        return [_loader(dataset, consumed_samples, self.cfg) for _ in self.chunks]

    def train_step(self, data_iterators) -> dict:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss, microbatch_losses = self._run_batches(data_iterators, self.num_microbatches, forward_only=False)
        self._stop_if_diverged("loss", loss)  # before the update: the weights in memory stay the last good ones
        _, grad_norm, _ = self.optimizer.step()
        self._stop_if_diverged("gradient norm", grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step(increment=1)
        self.iteration += 1
        self.consumed_samples += self.cfg.global_batch_size
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "microbatch_losses": microbatch_losses}

    def _stop_if_diverged(self, what: str, value: float) -> None:
        if value is None or math.isfinite(value):
            return
        last = checkpoint.latest_iteration(self.cfg.save)
        kept = (f"the last good checkpoint, {checkpoint.iteration_dir(self.cfg.save, last)}, is kept (resume "
                f"from it with --load, e.g. with a lower --lr)") if last is not None else "no checkpoint was saved"
        raise TrainingDiverged(f"{what} is {value} at iteration {self.iteration + 1}; stopped without saving: {kept}")

    @torch.no_grad()
    def evaluate(self, dataset) -> float:
        for chunk in self.chunks:
            chunk.eval()
        loss, _ = self._run_batches(self.data_iterators(dataset, 0), self.num_microbatches * self.cfg.eval_iters,
                                    forward_only=True)
        for chunk in self.chunks:
            chunk.train()
        return loss


def global_losses(entries: list, num_microbatches: int):
    """(loss of the global batch, per-micro-batch losses in global sample order) from this rank's
    [loss sum, token count] per micro-batch. Only the last pipeline stage has entries, and tensor-parallel ranks
    hold identical ones, which leaves every ratio unchanged."""
    # [micro-batch, data-parallel rank, (loss sum, tokens)]
    sums = torch.zeros(num_microbatches, parallel_state.get_data_parallel_world_size(), 2,
                       dtype=torch.float64, device=parallel.device())
    for microbatch, entry in enumerate(entries):
        sums[microbatch, parallel_state.get_data_parallel_rank()] = entry.to(sums)
    dist.all_reduce(sums)
    loss = (sums[..., 0].sum() / sums[..., 1].sum().clamp(min=1)).item()
    # Row-major order is the global sample order: round m of rank r holds micro-batch m * DP + r.
    per_microbatch = (sums[..., 0] / sums[..., 1].clamp(min=1)).flatten().tolist()
    return loss, per_microbatch


def _num_samples(cfg: TrainingConfig):
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


def _model_key(index: int, num_chunks: int) -> str:
    """Megatron-LM's checkpoint keys: `model`, or `model0`, `model1`, ... with interleaved pipelining."""
    return "model" if num_chunks == 1 else f"model{index}"


def _mean(values):
    return sum(values) / len(values) if values else None


def make_trainer(cfg: TrainingConfig) -> Trainer:
    if cfg.deepspeed.enabled:
        from megatron_patch.engine import DeepSpeedTrainer  # imports DeepSpeed only when asked for

        return DeepSpeedTrainer(cfg)
    return Trainer(cfg)


def pretrain(cfg: TrainingConfig) -> dict:
    """Run one phase; returns its summary (also printed)."""
    parallel.seed_everything(cfg.seed)  # a phase run after another starts exactly as if run alone
    trainer = make_trainer(cfg)
    trainer.load()
    train_ds, valid_ds = trainer.build_datasets()
    data = trainer.data_iterators(train_ds, trainer.consumed_samples)
    log(f"phase: patch size K={cfg.patch_size}, {cfg.seq_length} tokens = {cfg.num_patches} positions per "
        f"sample, {cfg.global_batch_size} samples = {cfg.tokens_per_step} tokens per step, "
        f"{cfg.train_iters} iterations, world size {dist.get_world_size()}")
    log_file = None
    if cfg.log_json and dist.get_rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.log_json)), exist_ok=True)
        log_file = open(cfg.log_json, "a")
    start_iteration, window_losses, step_times, losses = trainer.iteration, [], [], []
    early_exit = EarlyExit(cfg)
    valid_loss = None
    while trainer.iteration < cfg.train_iters:
        started = time.perf_counter()
        stats = trainer.train_step(data)
        step_times.append(time.perf_counter() - started)
        window_losses.append(stats["loss"])
        losses.append(stats["loss"])
        stats.update(iteration=trainer.iteration, tokens_per_sec=cfg.tokens_per_step / step_times[-1],
                     consumed_tokens=trainer.consumed_samples * cfg.seq_length)
        if trainer.iteration % cfg.log_interval == 0 or trainer.iteration == cfg.train_iters:
            log(f"iteration {trainer.iteration:6d}/{cfg.train_iters} | loss {sum(window_losses) / len(window_losses):.4f}"
                f" | lr {stats['lr']:.3e} | grad norm {stats['grad_norm']:.3f}"
                f" | tokens/s {stats['tokens_per_sec']:.0f} | {1000 * step_times[-1]:.0f} ms/iter")
            window_losses = []
        if log_file:
            log_file.write(json.dumps(stats) + "\n")
            log_file.flush()
        if valid_ds is not None and trainer.iteration % cfg.eval_interval == 0:
            valid_loss = trainer.evaluate(valid_ds)
            log(f"iteration {trainer.iteration:6d} | validation loss {valid_loss:.4f}")
        if cfg.save and cfg.save_interval and trainer.iteration % cfg.save_interval == 0:
            trainer.save()
        reason = early_exit.reason(trainer.iteration)
        if reason and trainer.iteration < cfg.train_iters:
            log(f"stopping after iteration {trainer.iteration}: {reason}")
            break
    if cfg.save and checkpoint.latest_iteration(cfg.save) != trainer.iteration:
        trainer.save()
    if valid_ds is not None and valid_loss is None:
        valid_loss = trainer.evaluate(valid_ds)
    # The first step pays for warm-up (allocation, caches): leave it out of the throughput when possible.
    timed = step_times[1:] or step_times
    summary = {
        "patch_size": cfg.patch_size,
        "iterations": trainer.iteration - start_iteration,
        "tokens": (trainer.iteration - start_iteration) * cfg.tokens_per_step,
        "tokens_per_sec": len(timed) * cfg.tokens_per_step / sum(timed) if timed else 0.0,
        "seconds": sum(step_times),
        # Mean over a few steps at each end: single-step losses are noisy.
        "first_train_loss": _mean(losses[: max(1, len(losses) // 4)]),
        "final_train_loss": _mean(losses[-max(1, len(losses) // 4):]),
        "valid_loss": valid_loss,
        # Where the phase stands (a run stopped early by a signal resumes from here with --load).
        "iteration": trainer.iteration,
        "train_iters": cfg.train_iters,
    }
    log("phase summary: " + json.dumps(summary))
    if log_file:
        log_file.write(json.dumps({"summary": summary}) + "\n")
        log_file.close()
    return summary


def _fail(error: Exception, code: int):
    print(f"pretrain_patch_gpt: error: {error}", file=sys.stderr)
    sys.exit(code)


def main(argv=None) -> None:
    """One phase, or with --patch-fraction a two-phase plan (both phases, or the one --phase names)."""
    try:
        cfg = parse_args(argv)
        world_size = parallel.launch_from_env().world_size
        if cfg.plan.patch_fraction is None:
            phases, the_plan = [cfg.resolve(world_size)], None
        else:
            the_plan = plan.make_plan(cfg)
            phases = plan.selected_phases(cfg, the_plan, world_size)
        parallel.initialize(phases[0].parallel, cfg.seed)
    except ConfigError as e:
        _fail(e, 2)
    try:
        if the_plan:
            log(the_plan.describe())
        for phase in phases:
            if the_plan and checkpoint.latest_iteration(phase.save) == phase.train_iters:
                log(f"{phase.save}: already complete at iteration {phase.train_iters}, skipped")
                continue
            pretrain(phase)
    except (ConfigError, DataError) as e:
        _fail(e, 2)
    except TrainingDiverged as e:
        _fail(e, 1)
    finally:
        parallel.destroy()


if __name__ == "__main__":
    main()
