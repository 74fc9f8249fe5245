"""What the trainer calls to save and restore a phase (the role of torchtitan's CheckpointManager): checkpoints in
--ckpt-format under --save, resuming from --load, and the weights-only start from --pretrained-checkpoint, each
behind the guards (guards.py) and written atomically (storage.py).

The trainer hands over what a checkpoint holds through four members: `models` (its model chunks, unwrapped),
`optimizer` (megatron-core's), `training_state()` / `restore_training_state(state)` (schedule, counters, RNG,
compute axis: the same in every format), and `weights_gathered()` (a context in which the weights are current).
Another engine with its own checkpoint files (DeepSpeed) subclasses this class and replaces `save` and `resume`.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_patch.checkpoint import guards, layout, storage
from megatron_patch.config.schema import TrainingConfig
from megatron_patch.distributed.parallel import print_rank_0

# The distributed optimizer's state in torch_dist: per parameter, so any TP/PP/DP layout can load it.
OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointManager:
    def __init__(self, cfg: TrainingConfig, run_description: dict):
        self.cfg, self.run_description = cfg, run_description

    # -- where a phase starts ----------------------------------------------------------------------------------
    def resume_iteration(self) -> Optional[int]:
        """The iteration --load holds (None: nothing to resume), after checking it fits this run."""
        iteration = layout.latest_iteration(self.cfg.load)
        if iteration is not None:
            self.check_compatible(self.cfg.load, iteration, resume=True)
        return iteration

    def pretrained(self) -> Optional[guards.SavedCheckpoint]:
        """--pretrained-checkpoint's latest iteration when this phase starts from its weights (not when --load
        resumes the phase), after checking its model fits this run."""
        root = self.cfg.pretrained_checkpoint
        if not root or layout.latest_iteration(self.cfg.load) is not None:
            return None
        saved = guards.locate(root)
        self.check_compatible(root, saved.iteration, resume=False)
        return saved

    def check_compatible(self, root: str, iteration: int, resume: bool) -> None:
        saved = layout.read_run(root, iteration)
        flag = "--load" if resume else "--pretrained-checkpoint"
        if saved is not None:
            guards.check_compatible(saved, self.run_description, f"{flag} {root} (iteration {iteration})", resume)

    # -- saving and resuming -----------------------------------------------------------------------------------
    def save(self, trainer, iteration: int, run: dict) -> str:
        """A checkpoint in --ckpt-format: torch_dist (every rank writes its shards) or the legacy per-rank files
        (with the distributed optimizer, its state gathered into distrib_optim.pt as Megatron-LM does)."""
        with trainer.weights_gathered():
            if self.cfg.ckpt_format == "torch_dist":
                return storage.save_torch_dist(self.cfg.save, iteration, self._sharded_state(trainer), run)
            return storage.save_with(self.cfg.save, iteration, run, lambda staging: self._write_legacy(trainer,
                                                                                                      staging))

    def resume(self, trainer, iteration: int) -> None:
        """Model, optimizer and training state from --load's checkpoint at `iteration`, in either format; a
        torch_dist checkpoint loads into any layout (the RNG streams only into the one that wrote it). With
        --no-load-optim the optimizer (and LR schedule) start afresh; with --no-load-rng the RNG streams."""
        directory = layout.iteration_dir(self.cfg.load, iteration)
        torch_dist = layout.is_torch_dist(directory)
        load_optim = not self.cfg.no_load_optim
        if torch_dist:
            saved = layout.read_run(self.cfg.load, iteration)["config"]["parallel"]
            same_layout = all(saved[k] == getattr(self.cfg.parallel, k) for k in guards.MODEL_PARALLEL_LAYOUT)
            sharded = self._sharded_state(trainer, is_loading=True, rng=same_layout and not self.cfg.no_load_rng,
                                          optimizer=load_optim)
            state = storage.load_torch_dist(directory, sharded)
            if not same_layout:
                print_rank_0("resuming in another model-parallel layout: dropout RNG streams start afresh")
        else:
            state = storage.load(self.cfg.load, iteration)
        models = trainer.models
        for i, model in enumerate(models):
            model.load_state_dict(state[layout.model_key(i, len(models))])
        if load_optim:
            trainer.optimizer.load_state_dict(state["optimizer"])
            if self.cfg.parallel.use_distributed_optimizer and not torch_dist:
                with torch.no_grad():  # fp32 training: the optimizer's main weights are views of the model's
                    trainer.optimizer.load_parameter_state(storage.shard_file(directory, layout.DISTRIB_OPTIM))
        trainer.restore_training_state(state)

    def _write_legacy(self, trainer, staging: str) -> None:
        models = trainer.models
        storage.write_shard(staging, {
            **{layout.model_key(i, len(models)): m.state_dict() for i, m in enumerate(models)},
            "optimizer": trainer.optimizer.state_dict(),
            **trainer.training_state(),
        })
        if self.cfg.parallel.use_distributed_optimizer:  # collective over data-parallel ranks; rank 0 writes
            trainer.optimizer.save_parameter_state(storage.shard_file(staging, layout.DISTRIB_OPTIM))

    def _sharded_state(self, trainer, is_loading: bool = False, rng: bool = True, optimizer: bool = True) -> dict:
        """What a torch_dist checkpoint holds: megatron-core's sharded model and optimizer state (global tensors,
        so any layout can load them), this rank's RNG streams as a per-(pipeline, tensor) rank object, and the
        training state, the same on every rank."""
        models = trainer.models
        chunks = {layout.model_key(i, len(models)): m.sharded_state_dict() for i, m in enumerate(models)}
        state = {**chunks, **trainer.training_state()}
        if optimizer:
            if is_loading and self.cfg.parallel.use_distributed_optimizer:
                _allocate_distributed_optimizer_state(trainer.optimizer)
            state["optimizer"] = trainer.optimizer.sharded_state_dict(chunks, is_loading=is_loading,
                                                                      metadata=OPTIMIZER_SHARDING)
        rng_states = state.pop("rng_state")
        if rng:
            state["rng_state"] = storage.rng_object(rng_states)
        return state


def _allocate_distributed_optimizer_state(optimizer) -> None:
    """megatron-core 0.16's DistributedOptimizer reads Adam's step counter to describe its state for a load; with
    torch's Adam (no apex or Transformer Engine) the counter exists only after a first step. Its own helper takes a
    zero-gradient step; the load then overwrites every value that step touched."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()
