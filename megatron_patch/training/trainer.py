"""The state of one phase and its step. `Trainer(cfg, engine_class)` builds the model chunks (from
--pretrained-checkpoint's weights in a phase 2), hands them to an engine (engine.py: megatron-core's DDP and
optimizer, or DeepSpeed) and keeps what the loop needs: the iteration, consumed samples, the compute axis, data
iterators. `train_step` is the one step skeleton (forward/backward, divergence guard, optimizer step, schedule,
counters); checkpoints go through the engine's CheckpointManager. The loop itself is loop.py.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core import parallel_state

from megatron_patch.checkpoint import layout
from megatron_patch.checkpoint.guards import describe_run
from megatron_patch.checkpoint.model_chunks import model_chunks
from megatron_patch.config.schema import TrainingConfig, padded_vocab_size, to_dict
from megatron_patch.config.tokenizer import TokenizerSpec
from megatron_patch.data.dataset import alignment_pad_id, dataset_sizes, datasets_for, micro_batches
from megatron_patch.data.tokenizers.wrappers import build_tokenizer
from megatron_patch.data.unigram import context_free_bound
from megatron_patch.distributed import parallel
from megatron_patch.distributed.parallel import print_rank_0
from megatron_patch.distributed.step import global_losses, run_schedule
from megatron_patch.errors import MegatronPatchError
from megatron_patch.method.flops import training_flops_per_sample
from megatron_patch.method.model import transformer_config
from megatron_patch.training.engine import MegatronEngine


class TrainingDiverged(MegatronPatchError, RuntimeError):
    """A non-finite loss or gradient norm: the run stops without saving, the last good checkpoint stays."""

    exit_code = 1


class Trainer:
    """Model chunks, engine, counters and data of one phase."""

    def __init__(self, cfg: TrainingConfig, engine_class=MegatronEngine):
        self.cfg = cfg
        if cfg.disable_bf16_reduced_precision_matmul:  # Megatron-LM's flag; read by CUDA's bf16 GEMMs only
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        self.tokenizer = build_tokenizer(TokenizerSpec.of(cfg.data))
        self.run_description = describe_run(cfg, dataset_sizes(*cfg.data.training_blend()))
        self.checkpoints = engine_class.checkpoint_manager(cfg, self.run_description)
        # The compute axis (flops.py): tokens and model FLOPs since the start of the run, earlier phases included.
        self.flops_per_step = cfg.global_batch_size * training_flops_per_sample(
            cfg.model, cfg.seq_length, cfg.patch_size, padded_vocab_size(self.tokenizer.vocab_size, 1))
        self.compute = {"tokens": 0, "flops": 0}
        self.iteration = 0
        self.consumed_samples = 0
        # Chunks of one rank share one config; pretrained weights are loaded before the engine wraps them, so
        # gradient buffers, fp32 master copies and ZeRO partitions all start from them.
        config = transformer_config(cfg.model, cfg.parallel, cfg.bf16, cfg.fp16, cfg.fp8)
        pretrained = self.checkpoints.pretrained()
        models = model_chunks(cfg.model, cfg.parallel, self.tokenizer.vocab_size, cfg.patch_size, config,
                              weights_from=pretrained.directory if pretrained else None)
        if pretrained:
            self.compute = dict((pretrained.run or {}).get("compute", self.compute))
            print_rank_0(f"initialised weights from {pretrained.root} (iteration {pretrained.iteration}); fresh "
                         f"optimizer and LR schedule")
        self.engine = engine_class(cfg, config, models)

    @property
    def models(self) -> list:
        return self.engine.models

    @property
    def optimizer(self):
        return self.engine.optimizer

    @property
    def scheduler(self):
        return self.engine.scheduler

    def weights_gathered(self):
        return self.engine.weights_gathered()

    # -- the step --------------------------------------------------------------------------------------------------
    def train_step(self, data_iterators) -> dict:
        loss, microbatch_losses = self.engine.forward_backward(data_iterators)
        self._stop_if_diverged("loss", loss)  # before the update: the weights in memory stay the last good ones
        loss_scale = self.engine.loss_scale
        applied, grad_norm = self.engine.optimizer_step(self.iteration)
        self._stop_if_diverged("gradient norm", grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        if applied:
            self.scheduler.step(increment=1)
        else:
            self._stop_if_overflow_at_floor(loss_scale)
        # As Megatron-LM: a skipped (overflowed) step still counts as an iteration and consumes its samples; only
        # the LR schedule waits.
        self.iteration += 1
        self.consumed_samples += self.cfg.global_batch_size
        self.compute["tokens"] += self.cfg.tokens_per_step
        self.compute["flops"] += self.flops_per_step
        stats = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "microbatch_losses": microbatch_losses}
        if loss_scale is not None:
            stats.update(loss_scale=loss_scale, skipped=not applied)
        return stats

    def _stop_if_overflow_at_floor(self, loss_scale: float) -> None:
        """An fp16 overflow is skipped and the dynamic scale backs off; an overflow at --min-loss-scale, where it
        cannot back off any further, is a non-finite gradient that no scale avoids: the run diverged."""
        o = self.cfg.optim
        if o.loss_scale is None and loss_scale <= o.min_loss_scale:
            self._stop(f"the gradients are not finite even at the minimum loss scale {loss_scale:g} "
                       f"(--min-loss-scale)")

    def _stop_if_diverged(self, what: str, value: Optional[float]) -> None:
        if value is not None and not math.isfinite(value):
            self._stop(f"{what} is {value}")

    def _stop(self, problem: str) -> None:
        if not self.cfg.check_for_nan_in_loss_and_grad:
            return
        last = layout.latest_iteration(self.cfg.save)
        kept = (f"the last good checkpoint, {layout.iteration_dir(self.cfg.save, last)}, is kept (resume "
                f"from it with --load, e.g. with a lower --lr)") if last is not None else "no checkpoint was saved"
        raise TrainingDiverged(f"{problem} at iteration {self.iteration + 1}; stopped without saving: {kept}")

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
            entries = run_schedule(self.engine.chunks, self.data_iterators(dataset, 0, view.micro_batch_size),
                                   num_microbatches, view.num_patches, view.micro_batch_size, forward_only=True)
        for model in self.models:
            model.patch_size = self.cfg.patch_size
            model.train()
        return global_losses(entries, num_microbatches)[0]

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Resume from --load if it holds a checkpoint (weights from --pretrained-checkpoint were loaded before)."""
        iteration = self.checkpoints.resume_iteration()
        if iteration is not None:
            self.checkpoints.resume(self, iteration)
            print_rank_0(f"resumed from {self.cfg.load} at iteration {self.iteration}")

    def save(self) -> None:
        path = self.checkpoints.save(self, self.iteration, self.run_record())
        print_rank_0(f"saved checkpoint {path}")

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
        """Counters, compute axis, and (unless --no-load-optim / --no-load-rng) the LR schedule and RNG streams.
        A fresh schedule restarts its warmup, as in Megatron-LM."""
        if not self.cfg.no_load_optim:
            self.scheduler.load_state_dict(state["opt_param_scheduler"])
        self.iteration, self.consumed_samples = state["iteration"], state["consumed_samples"]
        if "rng_state" in state and not self.cfg.no_load_rng:
            parallel.set_rng_states(state["rng_state"])
        # Checkpoints from before the compute axis: this phase's own steps.
        self.compute = dict(state.get("compute") or {"tokens": self.iteration * self.cfg.tokens_per_step,
                                                     "flops": self.iteration * self.flops_per_step})

    def run_record(self) -> dict:
        """run.json of a checkpoint: what the run trained on (resume guards) and the compute spent up to it (the
        next phase's compute axis starts there)."""
        return {**self.run_description, "compute": dict(self.compute)}

    # -- data ------------------------------------------------------------------------------------------------------
    def build_datasets(self):
        """(train, validation) PatchGPTDatasets; validation is None when --split (or no --valid-data-path) gives it
        nothing."""
        train, valid, _ = datasets_for(self.cfg, self.tokenizer)
        return train, valid

    def context_free_bound(self) -> Optional[float]:
        """The unigram entropy of the blend this phase trains on (the pad id of patch-aligned data left out, as its
        labels get no loss)."""
        prefixes, weights = self.cfg.data.training_blend()
        if not prefixes:  # --mock-data: ids 1, 2, 3, ... bound nothing worth saying
            return None
        return context_free_bound(prefixes, weights, alignment_pad_id(prefixes, self.tokenizer),
                                  self.cfg.data.data_cache_path)

    def data_iterators(self, dataset, consumed_samples: int, micro_batch_size: Optional[int] = None) -> list:
        """One iterator per model chunk over the same samples: each chunk of an interleaved pipeline reads
        every micro-batch (the first stage for tokens, the last for labels)."""
        cfg = self.cfg
        return [micro_batches(dataset, consumed_samples, micro_batch_size or cfg.micro_batch_size,
                              parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
                              cfg.data.num_workers, cfg.seed)
                for _ in self.engine.chunks]
