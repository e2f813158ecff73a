"""CPU (gloo) backend for Megatron-Core: run the local (non-Transformer-Engine) layer spec without a GPU.

Why this exists: every parallel layout of the project (TP / PP / CP / DP, the distributed optimizer) must be
tested in CI, and CI has no GPU. Megatron-Core's math runs fine on CPU tensors, but a handful of places assume
CUDA:

1. ``torch.cuda.current_device()`` is used as the ``device=`` of freshly allocated buffers (tensor-parallel
   all-gathers, pipeline p2p shape exchange, DDP grad buffers, RoPE). On a CPU-only torch it raises.
2. A few places hard-code ``device="cuda"`` or call ``.cuda()`` (pipeline schedules' token counter,
   ``clip_grads``, the optimizers' ``found_inf`` / grad-scaler tensors, the distributed optimizer).
3. The tensor-parallel RNG tracker (``CudaRNGStatesTracker``) forks the CUDA generator around every
   model-parallel random op (weight init, dropout).

:func:`enable_cpu_backend` fixes exactly these, process-wide:

* ``torch.cuda.current_device`` returns ``torch.device("cpu")``, so (1) allocates on the CPU;
* a :class:`torch.overrides.TorchFunctionMode` rewrites a CUDA ``device=`` argument of tensor factories and
  ``Tensor.to`` to the CPU and makes ``Tensor.cuda()`` a no-op, which covers (2) without patching Megatron's
  source line by line (and keeps working when Megatron adds another ``device="cuda"``);
* the RNG tracker keeps its named states as *CPU* generator states, so forking still gives each TP rank its
  own dropout/init stream, exactly as on GPU;
* ``Tensor.type()`` (no arguments) answers with the CUDA type name, since Megatron's optimizers recognise fp32
  parameters and grads by the string ``"torch.cuda.FloatTensor"``;
* ``torch.cuda.synchronize`` / ``Stream`` / ``current_stream`` / ``Event`` become harmless stubs (DDP, the
  schedules and the MoE all-to-all dispatcher call them to order work that is synchronous on CPU).

It is **inert when CUDA is available**: :func:`enable_cpu_backend` then returns ``False`` and changes nothing,
so importing it in production code is safe. It is meant for gloo process groups with the local layer spec
(``get_gpt_layer_local_spec``) and the project's torch core attention; Transformer Engine is GPU-only.

The function mode is pushed on the calling thread (torch keeps the mode stack per thread); Megatron's CPU work,
autograd's CPU backward included, runs on that thread. Call it once per process, before
``parallel_state.initialize_model_parallel`` (see :func:`initialize_cpu_model_parallel`).
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Any, Optional

import torch
from torch.overrides import TorchFunctionMode

__all__ = [
    "enable_cpu_backend",
    "is_cpu_backend_enabled",
    "initialize_cpu_model_parallel",
    "destroy_cpu_model_parallel",
]

_ENABLED = False
_MODE: Optional["_CudaToCpuMode"] = None
_CPU = torch.device("cpu")


def _is_cuda_device(device: Any) -> bool:
    """True for every spelling of a CUDA device: "cuda", "cuda:1", torch.device("cuda", 0), or a bare int."""
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal in torch's factory functions.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Redirects CUDA placements to the CPU for every torch function called under it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron's optimizers dispatch on the type *string* ("torch.cuda.FloatTensor" is how they recognise
            # an fp32 parameter/grad). On this backend the CPU plays the CUDA device, so report it as such.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if func is torch.Tensor.to:
            args = tuple(_CPU if _is_cuda_device(a) else a for a in args)
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            # Megatron pins small host tensors before a non-blocking copy to the GPU (e.g. the CP slice of the
            # rotary embedding); without an accelerator there is no pinned allocator, and nothing to overlap.
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


class _NullEvent:
    """Stands in for ``torch.cuda.Event``: CPU work has already happened when the event is recorded."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: CPU work is synchronous, so there is nothing to order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_event(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record_event(self, *args: Any, **kwargs: Any) -> _NullEvent:
        return _NullEvent()

    def synchronize(self) -> None:
        pass

    def __enter__(self) -> "_NullStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _patch_rng_tracker() -> None:
    """Make Megatron's tensor-parallel RNG tracker keep CPU generator states instead of CUDA ones."""
    from megatron.core.tensor_parallel import random as mrandom

    def _get_state(*args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.get_rng_state()

    def _set_state(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        torch.set_rng_state(new_state)

    def add(self, name: str, seed: int) -> None:
        # Same contract as CudaRNGStatesTracker.add, on the CPU generator.
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    mrandom._get_cuda_rng_state = _get_state
    mrandom._set_cuda_rng_state = _set_state
    mrandom.CudaRNGStatesTracker.add = add


def enable_cpu_backend() -> bool:
    """Let Megatron-Core's local layer spec, parallel_state, schedules and optimizers run on CPU over gloo.

    Returns ``True`` when the backend is (now) active, ``False`` when CUDA is available, in which case nothing
    is changed. Idempotent per thread.
    """
    global _ENABLED, _MODE
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True

    torch.cuda.current_device = lambda: _CPU  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.Stream = _NullStream  # type: ignore[assignment,misc]
    torch.cuda.current_stream = lambda *a, **k: _NullStream()  # type: ignore[assignment]
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]
    torch.cuda.Event = _NullEvent  # type: ignore[assignment,misc]
    _patch_rng_tracker()

    _MODE = _CudaToCpuMode()
    _MODE.__enter__()  # stays pushed for the life of the process (thread)
    _ENABLED = True
    return True


def is_cpu_backend_enabled() -> bool:
    """Whether :func:`enable_cpu_backend` is active in this process."""
    return _ENABLED


def initialize_cpu_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    seed: int = 1234,
    timeout_s: int = 300,
) -> None:
    """Initialize torch.distributed over gloo (from the usual env:// variables) and Megatron's parallel state.

    Works on CPU (enables the CPU backend) and is the one place the tests and the CPU demo set up parallelism.
    ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` must be set (torchrun does this).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    enable_cpu_backend()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="gloo",
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            timeout=timedelta(seconds=timeout_s),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_cpu_model_parallel() -> None:
    """Tear down Megatron's parallel state and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
