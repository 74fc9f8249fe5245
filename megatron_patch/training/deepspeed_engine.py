"""DeepSpeed ZeRO (stages 0-3) around megatron-core's PatchGPTModel: `--deepspeed --deepspeed_config FILE`.

Who does what:
  megatron-core  tensor and pipeline parallelism: process groups, layers, pipeline schedules
  DeepSpeed      data parallelism: gradient reduction, ZeRO partitioning (optimizer state, gradients, parameters),
                 gradient clipping, the optimizer step, checkpoints of all that
  this module    the mpu adapter between the two; the engine's step hooks (engine.py); a CheckpointManager that
                 writes DeepSpeed's checkpoints under our atomic tracker, each with a consolidated fp32 copy of the
                 weights in Megatron's layout.
                 The JSON handed to the engine is resolved (and checked) before any work: config/deepspeed.py

The step. Without pipeline parallelism every micro-batch goes through the engine (forward, engine.backward,
engine.step): ZeRO-2/3 reduce and partition gradients inside backward, in hooks only engine.backward drives. With
pipeline parallelism (DeepSpeed allows it with ZeRO-1 only here, see config/deepspeed.py) megatron-core's 1F1B schedule
runs the model chunks, so activations and their gradients cross stages through megatron-core's p2p exactly as
without DeepSpeed; the gradients it accumulates in param.grad are reduced by the engine at one accumulation boundary
and the engine takes the optimizer step.

The LR schedule is megatron's OptimizerParamScheduler over the engine's optimizer (a DeepSpeed "scheduler" is
refused), restarted with the optimizer by each phase; its state travels in the checkpoint's client state.
"""

from __future__ import annotations

import copy
import importlib
import json
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import _get_param_groups, get_standard_config_overrides
from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from megatron_patch.checkpoint import layout, storage
from megatron_patch.checkpoint.manager import CheckpointManager
from megatron_patch.config.schema import TrainingConfig, to_dict
from megatron_patch.distributed import parallel
from megatron_patch.distributed.parallel import print_rank_0
from megatron_patch.distributed.step import forward_step, global_losses, lr_scheduler, megatron_optimizer_config
from megatron_patch.training.engine import Engine


class MegatronMpu:
    """megatron-core's parallel_state under the names DeepSpeed calls on its `mpu` argument. DeepSpeed's "model
    parallel" group is megatron's tensor x pipeline group (checkpoint shard names, the gradient-norm all-reduce);
    ZeRO partitions over megatron's data-parallel group. (`parallel_state` itself does not fit: it has no
    get_model_parallel_rank/world_size.)"""

    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_src_rank = staticmethod(parallel_state.get_tensor_model_parallel_src_rank)
    get_pipeline_model_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(parallel_state.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(parallel_state.get_pipeline_model_parallel_group)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
    get_model_parallel_group = staticmethod(parallel_state.get_model_parallel_group)

    @staticmethod
    def get_model_parallel_rank() -> int:
        return dist.get_rank(parallel_state.get_model_parallel_group())

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return dist.get_world_size(parallel_state.get_model_parallel_group())

    @staticmethod
    def get_data_parallel_group_ranks() -> list:
        return dist.get_process_group_ranks(parallel_state.get_data_parallel_group())


def for_this_device(ds: dict) -> dict:
    """The resolved DeepSpeed config as this machine runs it: on CPU with torch's AdamW (DeepSpeed's CPU Adam would
    JIT-compile for ~45 s)."""
    if torch.cuda.is_available():
        return ds
    ds = copy.deepcopy(ds)
    ds["optimizer"]["params"].setdefault("torch_adam", True)
    return ds


def _import_deepspeed():
    """DeepSpeed, imported only once a run uses it (configuration errors stay fast and quiet). On CPU: named as the
    accelerator (no "unable to detect" warning), and without its shared-memory all-reduce, which it JIT-compiles
    (~25 s per fresh machine) when it sets up communication although only its inference all-reduce uses it;
    training talks through gloo."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not torch.cuda.is_available():
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


# -- training ----------------------------------------------------------------------------------------------------

class DeepSpeedCheckpointManager(CheckpointManager):
    """DeepSpeed's checkpoint (model, ZeRO partitions, our training state as client state) plus the full-precision
    weights in Megatron's layout (what --pretrained-checkpoint reads), committed by our atomic tracker."""

    def save(self, trainer, iteration: int, run: dict) -> str:
        engine = trainer.engine.ds_engine

        def write(staging: str) -> None:
            engine.save_checkpoint(os.path.dirname(staging), tag=os.path.basename(staging),
                                   client_state=trainer.training_state(), save_latest=False)
            export_weights(trainer.models, iteration, trainer.cfg, staging)

        return storage.save_with(self.cfg.save, iteration, run, write)

    def resume(self, trainer, iteration: int) -> None:
        """The engine (model, optimizer, ZeRO partitions) and our training state from --load."""
        engine = trainer.engine.ds_engine
        tag = os.path.basename(layout.iteration_dir(self.cfg.load, iteration))
        # DeepSpeed's own reader unpickles with weights_only=False: every file it reads goes through ours instead.
        engine.checkpoint_engine.load = lambda path, map_location=None: storage.read(
            path, deepspeed_safe_globals(), map_location)
        _, client_state = engine.load_checkpoint(self.cfg.load, tag=tag, load_lr_scheduler_states=False,
                                                 load_optimizer_states=not self.cfg.no_load_optim)
        trainer.restore_training_state(client_state)


class DeepSpeedEngine(Engine):
    """Data parallelism, optimizer and checkpoints of a DeepSpeed engine around the model chunks."""

    checkpoint_manager = DeepSpeedCheckpointManager

    def __init__(self, cfg: TrainingConfig, config, models: list):
        super().__init__(cfg)
        # megatron's parameter groups: no weight decay on biases and norms (wd_mult 0, read by the LR schedule).
        # megatron-core's groups as its own optimizer gets them: no weight decay on biases and norms. Passed
        # explicitly: from 0.19 `None` means no overrides at all (weight decay on every parameter).
        optimizer_config = megatron_optimizer_config(cfg, config.params_dtype)
        groups = _get_param_groups(models, optimizer_config, get_standard_config_overrides(optimizer_config))
        for param in (p for m in models for p in m.parameters()):
            # megatron marks the last stage's copy of a tied embedding `shared`; DeepSpeed's gradient norm skips
            # parameters it is told another pipeline stage also holds.
            param.ds_pipe_replicated = getattr(param, "shared", False)
        # DeepSpeed insists on LOCAL_RANK, which srun and a lone process do not set; parallel knows it from any
        # launcher.
        os.environ.setdefault("LOCAL_RANK", str(parallel.launch_from_env().local_rank))
        self.ds_engine, self.optimizer, _, _ = _import_deepspeed().initialize(
            model=models[0] if len(models) == 1 else torch.nn.ModuleList(models),
            model_parameters=[group for group in groups if group["params"]],
            config=for_this_device(cfg.deepspeed.resolved),
            mpu=MegatronMpu(),
            dist_init_required=False,
        )
        self.chunks = models  # what megatron-core's schedules run (evaluation; pipelined steps)
        self.pipelined = cfg.parallel.pipeline_model_parallel_size > 1
        self.scheduler = lr_scheduler(self.optimizer, cfg.optim)
        # ZeRO-0 in fp32 hands the gradients to a plain torch optimizer, which reports no norm.
        self.norm_from_grads = self.ds_engine.zero_optimization_stage() == 0 and not cfg.bf16

    def forward_backward(self, data_iterators):
        if not self.pipelined:
            return self._engine_micro_batches(data_iterators[0])
        self.ds_engine.set_gradient_accumulation_boundary(False)  # reduce nothing while the schedule runs
        losses = self.run_batches(data_iterators, self.num_microbatches, forward_only=False)
        self._allreduce_tied_embedding_grads()
        self.ds_engine.set_gradient_accumulation_boundary(True)
        self.ds_engine.allreduce_gradients()
        return losses

    def optimizer_step(self, iteration: int):
        grad_norm = self._grad_norm_before_step()
        self.ds_engine.step()  # the accumulation boundary: ZeRO's reduction epilogue, clipping, the optimizer step
        grad_norm = self.ds_engine.get_global_grad_norm() if grad_norm is None else grad_norm
        if iteration == 0:
            footprint = memory_footprint(self.ds_engine)
            print_rank_0(f"deepspeed: ZeRO stage {self.ds_engine.zero_optimization_stage()}, rank 0 holds "
                         f"{footprint['parameter_bytes']} bytes of parameters and {footprint['optimizer_bytes']} bytes "
                         f"of optimizer state ({json.dumps(footprint)})")
        return True, None if grad_norm is None else float(grad_norm)  # bf16 or fp32: no step is skipped

    def _allreduce_tied_embedding_grads(self) -> None:
        """Tied input and output embeddings live on the first and the last pipeline stage: sum their gradients
        (what megatron-core's finalize_model_grads does for its own DDP)."""
        if self.cfg.model.untie_embeddings_and_output_weights:
            return
        for chunk in {self.chunks[0], self.chunks[-1]}:
            if chunk.pre_process or chunk.post_process:
                dist.all_reduce(chunk.shared_embedding_or_output_weight().grad,
                                group=parallel_state.get_embedding_group())

    def _engine_micro_batches(self, data_iterator):
        """Forward and engine.backward of every micro-batch of the global batch as DeepSpeed drives them (it divides
        by the accumulation steps and reduces at the boundary), engine.step after each but the last: the caller's
        engine.step() ends the global batch."""
        entries = []
        for microbatch in range(self.num_microbatches):
            if microbatch:
                self.ds_engine.step()  # not a boundary yet: counts the micro-batch, no update
            per_token_loss, reduce_loss = forward_step(data_iterator, self.ds_engine)
            total, num_tokens, reported = reduce_loss(per_token_loss)
            self.ds_engine.backward(total / num_tokens.clamp(min=1))  # as megatron-core's schedules normalise
            entries.append(reported["lm loss"])
        return global_losses(entries, self.num_microbatches)

    def _grad_norm_before_step(self):
        """The global gradient norm (what clipping sees) when the engine does not report one."""
        if not self.norm_from_grads:
            return None
        grads = [p.grad for m in self.chunks for p in m.parameters()
                 if p.grad is not None and param_is_not_tensor_parallel_duplicate(p)]
        return get_grad_norm_fp32(grads, grad_stats_parallel_group=parallel_state.get_model_parallel_group())


def deepspeed_safe_globals() -> list:
    """The non-tensor objects DeepSpeed's checkpoints hold (ZeRO's optimizer state), allowed by storage.read."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def consolidated_weights(chunks: list) -> dict:
    """Megatron checkpoint keys (`model` or `model0`, `model1`, ...) -> full fp32 state dict of this rank's chunks:
    ZeRO's fp32 partitions gathered over the data-parallel group, per tensor- and pipeline-parallel rank (so any
    layout works, unlike zero_to_fp32). Collective over the data-parallel group."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for index, model in enumerate(chunks):
        params = dict(model.named_parameters())
        state = {}
        for name, value in model.state_dict().items():
            if name in params:
                full = safe_get_full_fp32_param(params[name])  # None: plain fp32 parameter (ZeRO-0)
                value = params[name].detach() if full is None else full
            if torch.is_tensor(value) and value.is_floating_point():
                value = value.detach().float().cpu().clone()
            state[name] = value
        out[layout.model_key(index, len(chunks))] = state
    return out


def export_weights(chunks: list, iteration: int, cfg: TrainingConfig, directory: str) -> None:
    """Write this rank's consolidated fp32 weights as legacy shards (layout.SHARD_FILE) under `directory` (weights
    and config only, the layout reshard.full_state_dict and --pretrained-checkpoint read). Collective."""
    storage.write_shard(directory, {**consolidated_weights(chunks), "iteration": iteration, "config": to_dict(cfg)})


def memory_footprint(engine) -> dict:
    """Bytes of parameters and of optimizer state (fp32 master copies, Adam moments) this rank holds, each storage
    counted once: ZeRO-3 parameters count their local partition."""
    seen = set()

    def nbytes(tensors) -> int:
        total = 0
        for tensor in tensors:
            if torch.is_tensor(tensor) and tensor.numel() and tensor.untyped_storage().data_ptr() not in seen:
                seen.add(tensor.untyped_storage().data_ptr())
                total += tensor.untyped_storage().nbytes()
        return total

    parameter_bytes = nbytes(getattr(p, "ds_tensor", p) for p in engine.module.parameters())
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    optimizer_tensors = [p for group in inner.param_groups for p in group["params"]]
    optimizer_tensors += [t for state in inner.state.values() for t in state.values()]
    return {"parameter_bytes": parameter_bytes, "optimizer_bytes": nbytes(optimizer_tensors)}
