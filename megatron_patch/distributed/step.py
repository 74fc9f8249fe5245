"""The pieces of one training step that every trainer shares: the forward step megatron-core's schedules call,
the masked loss, the global loss of a batch across ranks, megatron's optimizer settings and LR schedule."""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_patch.config.schema import OptimizerConfig, TrainingConfig
from megatron_patch.distributed import parallel


def loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Masked sum and token count: the schedule divides by the count, logging sums both over ranks."""
    loss_mask = loss_mask.view(-1).float()
    total = torch.sum(per_token_loss.reshape(-1).float() * loss_mask)
    num_tokens = loss_mask.sum().to(torch.int)
    return total, num_tokens, {"lm loss": torch.stack([total.detach(), loss_mask.sum()])}


def forward_step(data_iterator, model):
    """megatron-core's forward_step_func: one micro-batch through the model (a PatchGPTModel, or an engine or
    wrapper around one), returning the per-token loss and how to reduce it."""
    batch = next(data_iterator)
    device = parallel.device()
    tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
    per_token_loss = model(tokens, None, None, labels=labels)
    return per_token_loss, partial(loss_func, batch["loss_mask"].to(device))


def _gathered_sums(entries: list, num_microbatches: int) -> torch.Tensor:
    """[micro-batch, data-parallel rank, (loss sum, token count)] of every rank, from this rank's entries. Only the
    last pipeline stage has entries, and tensor-parallel ranks hold identical ones, which leaves every ratio
    unchanged."""
    sums = torch.zeros(num_microbatches, parallel_state.get_data_parallel_world_size(), 2,
                       dtype=torch.float64, device=parallel.device())
    for microbatch, entry in enumerate(entries):
        sums[microbatch, parallel_state.get_data_parallel_rank()] = entry.to(sums)
    dist.all_reduce(sums)
    return sums


def global_losses(entries: list, num_microbatches: int):
    """(loss of the global batch, per-micro-batch losses in global sample order) from this rank's
    [loss sum, token count] per micro-batch."""
    sums = _gathered_sums(entries, num_microbatches)
    loss = (sums[..., 0].sum() / sums[..., 1].sum().clamp(min=1)).item()
    # Row-major order is the global sample order: round m of rank r holds micro-batch m * DP + r.
    per_microbatch = (sums[..., 0] / sums[..., 1].clamp(min=1)).flatten().tolist()
    return loss, per_microbatch


def global_loss_totals(entries: list, num_microbatches: int):
    """(summed loss in nats, token count) over every rank's micro-batches: what evaluation reports."""
    sums = _gathered_sums(entries, num_microbatches)
    return sums[..., 0].sum().item(), int(sums[..., 1].sum().item())


def run_schedule(chunks: list, data_iterators: list, num_microbatches: int, num_positions: int,
                 micro_batch_size: int, forward_only: bool) -> list:
    """megatron-core's schedule for this layout (no pipelining, 1F1B or interleaved) over a rank's model chunks;
    returns the last stage's [loss sum, token count] per micro-batch (empty on other stages)."""
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterators if len(data_iterators) > 1 else data_iterators[0],
        model=chunks,
        num_microbatches=num_microbatches,
        seq_length=num_positions,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    return [entry["lm loss"] for entry in losses]


def megatron_optimizer_config(cfg: TrainingConfig, params_dtype) -> MegatronOptimizerConfig:
    o = cfg.optim
    return MegatronOptimizerConfig(
        optimizer="adam",  # megatron-core's Adam applies decoupled weight decay: AdamW
        lr=o.lr,
        min_lr=o.min_lr,
        decoupled_lr=o.decoupled_lr,  # the embedding and output layer's own peak and final LR
        decoupled_min_lr=o.decoupled_min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=cfg.bf16,
        fp16=cfg.fp16,
        loss_scale=o.loss_scale,
        initial_loss_scale=o.initial_loss_scale,
        min_loss_scale=o.min_loss_scale,
        loss_scale_window=o.loss_scale_window,
        hysteresis=o.hysteresis,
        params_dtype=params_dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )


def lr_scheduler(optimizer, o: OptimizerConfig) -> OptimizerParamScheduler:
    """Megatron's LR (and weight-decay) schedule over any optimizer's param_groups, stepped once per iteration
    (resolved lengths: fractional where they came from samples or --lr-warmup-fraction); each phase starts anew."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.lr_warmup_iters,
        lr_decay_steps=o.lr_decay_iters,
        lr_decay_style=o.lr_decay_style,
        wsd_decay_steps=o.lr_wsd_decay_iters,
        lr_wsd_decay_style=o.lr_wsd_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=o.lr_decay_iters,
        wd_incr_style="constant",
    )
