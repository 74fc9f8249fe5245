"""What a training step does with the model chunks' gradients, per engine. An engine wraps the chunks it is given
and provides the step's two hooks (forward_backward, optimizer_step), its optimizer and LR schedule, and the
CheckpointManager class that knows its files. The Trainer holds one and runs the same loop on any of them.

  MegatronEngine     megatron-core's DDP (optionally its distributed optimizer), optimizer and schedules
  DeepSpeedEngine    deepspeed_engine.py: ZeRO 0-3 through a DeepSpeed engine
"""

from __future__ import annotations

import contextlib
from typing import Optional

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.transformer.module import Float16Module

from megatron_patch.checkpoint.manager import CheckpointManager
from megatron_patch.config.schema import TrainingConfig
from megatron_patch.distributed.parallel import print_rank_0
from megatron_patch.distributed.step import global_losses, lr_scheduler, megatron_optimizer_config, run_schedule
from megatron_patch.method.model import PatchGPTModel


class Engine:
    """The interface and what every engine shares: `chunks` (what megatron-core's schedules run), `models` (the
    PatchGPTModel chunks, unwrapped), `optimizer`, `scheduler`."""

    checkpoint_manager = CheckpointManager

    def __init__(self, cfg: TrainingConfig):
        self.cfg = cfg
        self.chunks: list = []
        self.optimizer = self.scheduler = None

    @property
    def models(self) -> list[PatchGPTModel]:
        return self.chunks

    @property
    def num_microbatches(self) -> int:
        dp = parallel_state.get_data_parallel_world_size()
        return self.cfg.global_batch_size // (self.cfg.micro_batch_size * dp)

    def run_batches(self, data_iterators, num_microbatches: int, forward_only: bool):
        """megatron-core's schedule over this rank's chunks: (loss, per-micro-batch losses) of the batches."""
        entries = run_schedule(self.chunks, data_iterators, num_microbatches, self.cfg.num_patches,
                               self.cfg.micro_batch_size, forward_only)
        return global_losses(entries, num_microbatches)

    def forward_backward(self, data_iterators):
        """Forward and backward of every micro-batch of one global batch: (loss, per-micro-batch losses)."""
        raise NotImplementedError

    def optimizer_step(self, iteration: int) -> tuple[bool, Optional[float]]:
        """Reduce, clip and apply the gradients: (applied, gradient norm). Not applied: --fp16's gradients
        overflowed at the current loss scale and the step was skipped (the norm is then None)."""
        raise NotImplementedError

    @property
    def loss_scale(self) -> Optional[float]:
        """--fp16: the loss scale the next step's backward uses; None without loss scaling."""
        return None

    @contextlib.contextmanager
    def weights_gathered(self):
        """A context in which every rank's weights are current (for a save or an evaluation)."""
        yield


class MegatronEngine(Engine):
    """megatron-core's DDP around each chunk, its optimizer and the LR schedule."""

    def __init__(self, cfg: TrainingConfig, config, models: list):
        super().__init__(cfg)
        p = cfg.parallel
        for vp_stage, chunk in enumerate(models):
            if cfg.bf16 or cfg.fp16:
                chunk = Float16Module(chunk.config, chunk)
            self.chunks.append(DistributedDataParallel(
                config,
                DistributedDataParallelConfig(grad_reduce_in_fp32=not p.grad_reduce_in_bf16,
                                              overlap_grad_reduce=p.overlap_grad_reduce,
                                              use_distributed_optimizer=p.use_distributed_optimizer,
                                              overlap_param_gather=p.overlap_param_gather,
                                              fp8_param_gather=cfg.fp8.param_gather),
                chunk,
                disable_bucketing=vp_stage > 0,  # as Megatron-LM: one bucket per rank is enough off the first chunk
            ))
        # As Megatron-LM's training.py: the schedules call these per chunk (a list with several chunks).
        config.no_sync_func = _one_or_list([chunk.no_sync for chunk in self.chunks])
        if p.overlap_grad_reduce:
            config.grad_sync_func = _one_or_list([chunk.start_grad_sync for chunk in self.chunks])
        if p.overlap_param_gather:
            config.param_sync_func = _one_or_list([chunk.start_param_sync for chunk in self.chunks])
        config.finalize_model_grads_func = finalize_model_grads
        self.optimizer = get_megatron_optimizer(megatron_optimizer_config(cfg, config.params_dtype), self.chunks)
        if cfg.fp16:  # as Megatron-LM: the schedules multiply each micro-batch's loss by the loss scale
            config.grad_scale_func = self.optimizer.scale_loss
        self.scheduler = lr_scheduler(self.optimizer, cfg.optim)
        held = sum(param.numel() for group in self.optimizer.param_groups for param in group["params"])
        total = sum(param.numel() for model in self.models for param in model.parameters())
        masters = ", fp32 master weights" if cfg.bf16 or cfg.fp16 else ""
        print_rank_0(f"optimizer state (Adam moments{masters}) on rank 0: {held:,} of this model-parallel rank's "
                     f"{total:,} parameters")

    @property
    def models(self) -> list[PatchGPTModel]:
        """The PatchGPTModel chunks of this rank, unwrapped from DDP (and Float16Module)."""
        unwrapped = [chunk.module for chunk in self.chunks]
        return [m.module if isinstance(m, Float16Module) else m for m in unwrapped]

    def forward_backward(self, data_iterators):
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        return self.run_batches(data_iterators, self.num_microbatches, forward_only=False)

    def optimizer_step(self, iteration: int) -> tuple[bool, Optional[float]]:
        applied, grad_norm, _ = self.optimizer.step()
        return applied, grad_norm

    @property
    def loss_scale(self) -> Optional[float]:
        return self.optimizer.get_loss_scale().item() if self.cfg.fp16 else None

    @contextlib.contextmanager
    def weights_gathered(self):
        """With --overlap-param-gather the updated weights arrive during the next forward pass: gather them now
        and keep the gathering hooks off meanwhile."""
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


def _one_or_list(funcs: list):
    return funcs if len(funcs) > 1 else funcs[0]
