"""Two megatron-core 0.16 fixes for its distributed optimizer over torch's Adam (no apex, no Transformer Engine:
always so on CPU, possible on GPU clusters), applied only in that case. Both concern Adam's per-parameter step
counter, which apex's and Transformer Engine's Adam keep per parameter group instead.

- DistributedOptimizer.load_state_dict gives every parameter the SAME step tensor; torch's Adam increments each
  parameter's counter in place, so after a resume the counter grew by the number of parameters per step and the
  bias correction was wrong (a resumed run drifted from the uninterrupted one). Each parameter gets its own copy.
- Loading a `fully_reshardable` state (torch_dist) copies every per-parameter state from the checkpoint, "step"
  included, while the checkpoint carries the step once for all parameters (restored by load_state_dict before the
  copy): KeyError 'step'. The copy leaves the restored step counter alone.
"""

from __future__ import annotations

from megatron.core.optimizer import distrib_optimizer

_applied = False


def _skipping_the_step_counter(set_states):
    def wrapper(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            if "step" in self.optimizer.state[main_param]:
                tensors = {**tensors, "step": self.optimizer.state[main_param]["step"]}
        return set_states(self, model_param, tensors)

    return wrapper


def _one_step_counter_per_parameter(load_state_dict):
    def wrapper(self, state_dict):
        load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()

    return wrapper


def apply_torch_adam_fixes() -> bool:
    """Apply once, and only when megatron-core runs on torch's Adam. Returns whether the fix is in place."""
    global _applied
    if not _applied and not distrib_optimizer.HAVE_APEX_OR_TE:
        cls = distrib_optimizer.DistributedOptimizer
        cls._set_main_param_and_optimizer_states = _skipping_the_step_counter(cls._set_main_param_and_optimizer_states)
        cls.load_state_dict = _one_step_counter_per_parameter(cls.load_state_dict)
        _applied = True
    return _applied
