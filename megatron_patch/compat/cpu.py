"""CPU shims for megatron-core, applied only when CUDA is unavailable.

megatron-core assumes CUDA in a few places (device of new tensors, the CUDA RNG tracker, CUDA tensor type
strings in the optimizer). On a CUDA machine `apply_cpu_shims()` does nothing, so the cluster code path is
megatron-core unmodified. Each shim is registered by name so tests can prove it is needed (run without it,
see the failure) and list what was applied.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

_SHIMS: dict = {}
_applied: list[str] = []
# The megatron-core release (major, minor) from which a shim is needed, where it is not needed by all the
# supported ones (tests/unit/test_compat_cpu.py shows each is needed from there on). Applied on any release: on an
# older one it replaces a function megatron-core does not call.
NEEDED_FROM: dict = {}

# Set to a comma-separated list of shim names to leave them out (used by the tests that show each is needed).
SKIP_ENV = "MEGATRON_PATCH_SKIP_CPU_SHIMS"


def _shim(fn=None, *, needed_from: tuple[int, int] | None = None):
    def register(fn):
        _SHIMS[fn.__name__] = fn
        if needed_from:
            NEEDED_FROM[fn.__name__] = needed_from
        return fn

    return register(fn) if fn else register


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


@_shim
def current_device_is_cpu():
    """~100 megatron-core call sites place new tensors on `torch.cuda.current_device()`."""
    torch.cuda.current_device = lambda: torch.device("cpu")


@_shim
def cuda_factories_make_cpu_tensors():
    """Hard-coded `device="cuda"` in tensor factories (schedules' token count, optimizer, grad clipping)."""

    def to_cpu(factory):
        @functools.wraps(factory)
        def wrapper(*args, **kwargs):
            if _is_cuda(kwargs.get("device")):
                kwargs["device"] = "cpu"
            return factory(*args, **kwargs)

        return wrapper

    for name in ("zeros", "ones", "empty", "full", "tensor", "arange"):
        setattr(torch, name, to_cpu(getattr(torch, name)))


@_shim
def cuda_synchronize_does_nothing():
    """dist_checkpointing's torch_dist writer calls `torch.cuda.synchronize()` before copying tensors to host
    memory; on CPU there is nothing to wait for."""
    torch.cuda.synchronize = lambda device=None: None


@_shim
def tensor_cuda_stays_on_cpu():
    """Tied embeddings with pipeline parallelism move the last stage's copy with `weight.data.cuda()` before
    all-reducing it with the first stage's."""
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


class _CPUStream:
    """The one stream of the CPU: every operation has finished before the next starts, so there is nothing to
    wait for."""

    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass


@_shim(needed_from=(0, 19))
def current_stream_is_the_cpu_stream():
    """From 0.19 the gradient buffers' start_grad_sync asks `torch.cuda.current_stream()` to wait for CUDA-graph
    events before every gradient reduction."""
    torch.cuda.current_stream = lambda device=None: _CPUStream()


@contextlib.contextmanager
def _cuda_rng_is_cpu_rng():
    saved = torch.cuda.get_rng_state, torch.cuda.manual_seed
    torch.cuda.get_rng_state, torch.cuda.manual_seed = (lambda *a, **k: torch.get_rng_state()), torch.manual_seed
    try:
        yield
    finally:
        torch.cuda.get_rng_state, torch.cuda.manual_seed = saved


@_shim
def cpu_rng_tracker():
    """megatron-core's RNG tracker (dropout in tensor-parallel regions) forks CUDA generator states; on CPU
    the tracked states are states of the CPU generator."""
    from megatron.core.tensor_parallel import random

    def get_state(device=None, clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    class CPURNGStatesTracker(random.CudaRNGStatesTracker):
        def add(self, name, seed):
            with _cuda_rng_is_cpu_rng():
                super().add(name, seed)

        @contextlib.contextmanager
        def fork(self, name=random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            # The parent's fork warns whenever the CPU generator moved inside the fork, which on CPU is the
            # whole point of forking; swap the states here instead.
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    random._get_cuda_rng_state = get_state
    random._set_cuda_rng_state = set_state
    random.CudaRNGStatesTracker = CPURNGStatesTracker


@contextlib.contextmanager
def _cpu_tensors_report_cuda_types():
    original = torch.Tensor.type

    def cuda_type_name(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and self.device.type == "cpu":
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = cuda_type_name
    try:
        yield
    finally:
        torch.Tensor.type = original


def _reporting_cuda_types(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cpu_tensors_report_cuda_types():
            return fn(*args, **kwargs)

    return wrapper


@_shim
def optimizer_accepts_cpu_tensors():
    """The optimizers and grad clipping check `param.type() == 'torch.cuda.FloatTensor'` (and the bf16/fp16
    names); inside those functions only, CPU tensors report the CUDA type names."""
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    clipped = _reporting_cuda_types(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = clipped
    optimizer.clip_grad_by_total_norm_fp32 = clipped
    for cls in (optimizer.Float16OptimizerWithFloat16Params, distrib_optimizer.DistributedOptimizer):
        cls.__init__ = _reporting_cuda_types(cls.__init__)


def pipeline_p2p_settings() -> dict:
    """TransformerConfig settings for pipeline point-to-point communication on gloo (empty with CUDA).

    - batch_p2p_sync synchronises with torch.cuda.synchronize(); waiting on the requests is enough here.
    - batch_p2p_comm batches isend/irecv; on gloo with two pipeline ranks the activations sent "next" and the
      gradients sent "prev" travel between the same pair of ranks and can land in each other's buffers (silently
      wrong losses with interleaved pipelining). The unbatched path orders them by rank parity and separates the
      two directions onto two process groups.
    """
    if torch.cuda.is_available():
        return {}
    return {"batch_p2p_sync": False, "batch_p2p_comm": False}


def apply_cpu_shims() -> list[str]:
    """Apply every shim once, if and only if CUDA is unavailable. Returns the names applied."""
    if torch.cuda.is_available() or _applied:
        return list(_applied)
    skip = set(filter(None, os.environ.get(SKIP_ENV, "").split(",")))
    for name, fn in _SHIMS.items():
        if name not in skip:
            fn()
            _applied.append(name)
    return list(_applied)
