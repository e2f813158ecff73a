"""Megatron-Core layer specs for the supported architectures, with a hook to swap the core attention.

Two module backends exist:

* ``"local"``: Megatron-Core's own modules (``get_gpt_layer_local_spec``). Runs on CPU (gloo tests, the CPU
  demo, the converters). Its norms are separate modules (``input_layernorm``, ``pre_mlp_layernorm``), but
  Megatron maps them to the Transformer Engine names in ``sharded_state_dict``, so checkpoints are
  interchangeable between the two backends.
* ``"te"``: Transformer Engine modules (fused norm+linear, fp8). Used when TE is importable *and* CUDA is
  available; ``"auto"`` picks it then.

Core attention is looked up in a small registry so that a later module (the torch SDPA attention for packed
sequences and CP on CPU) can register itself without touching this file: :func:`register_attention_backend`.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Callable, Dict

import torch

from megatron_offgrpo.models.architecture import ModelArchitecture

__all__ = [
    "te_available",
    "resolve_backend",
    "build_layer_spec",
    "register_attention_backend",
    "attention_backends",
    "resolve_attention_backend",
    "ATTENTION_BACKEND_CHOICES",
]

#: Values of ``model.attention_backend`` (the config switch); see :func:`resolve_attention_backend`.
ATTENTION_BACKEND_CHOICES = ("auto", "te", "torch", "local")

#: name -> zero-argument factory returning the core-attention module class or ModuleSpec.
_ATTENTION_BACKENDS: Dict[str, Callable[[], Any]] = {}


def register_attention_backend(name: str, factory: Callable[[], Any]) -> None:
    """Register a core-attention implementation usable as ``build_layer_spec(..., attention_backend=name)``.

    ``factory()`` returns what goes into ``SelfAttentionSubmodules.core_attention`` (a module class or a
    ``ModuleSpec``). ``"default"`` is reserved: it keeps the backend's own core attention.
    """
    if name == "default":
        raise ValueError("'default' is reserved for the backend's own core attention")
    _ATTENTION_BACKENDS[name] = factory


def attention_backends() -> list:
    """Names accepted by ``build_layer_spec(attention_backend=...)``."""
    return ["default", *sorted(_ATTENTION_BACKENDS)]


@functools.lru_cache(maxsize=1)
def te_available() -> bool:
    """Transformer Engine importable and CUDA present (TE is imported lazily, only here)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken install raising something else at import time
        return False
    return True


def resolve_backend(backend: str = "auto") -> str:
    """Map ``"auto"`` to ``"te"`` or ``"local"``; validate an explicit choice."""
    if backend == "auto":
        return "te" if te_available() else "local"
    if backend == "te" and not te_available():
        raise RuntimeError("backend='te' requested but Transformer Engine or CUDA is unavailable")
    if backend not in ("te", "local"):
        raise ValueError(f"unknown layer-spec backend {backend!r} (expected 'auto', 'te' or 'local')")
    return backend


def resolve_attention_backend(attention_backend: str, backend: str) -> str:
    """Map the config switch ``auto | te | torch | local`` (or ``default``) to a registered core attention.

    * ``auto``: Transformer Engine's core attention when TE is importable on a GPU, else the torch (SDPA) one;
    * ``te``: TE's ``TEDotProductAttention`` (packing and CP on GPU);
    * ``torch``: :class:`megatron_offgrpo.models.attention.TorchDotProductAttention` (packing and CP anywhere);
    * ``local``: Megatron's unfused ``DotProductAttention`` (no packing, no CP);
    * ``default``: whatever the module backend's spec carries (TE's for ``te``, Megatron's for ``local``).

    ``backend`` is the *resolved* module backend (``te`` or ``local``): with the TE spec, ``te`` is its own.
    """
    if attention_backend == "auto":
        attention_backend = "te" if te_available() else "torch"
    if attention_backend == "te":
        if not te_available():
            raise RuntimeError("model.attention_backend='te' needs Transformer Engine and CUDA; use 'torch' or 'auto'")
        return "default" if backend == "te" else "te"
    if attention_backend == "local":
        return "default" if backend == "local" else "local"
    return attention_backend


def build_layer_spec(arch: ModelArchitecture, backend: str = "auto", attention_backend: str = "default"):
    """The transformer-layer ``ModuleSpec`` for ``arch``.

    MoE layers use Megatron's per-expert ``SequentialMLP`` (no grouped GEMM), which keeps one
    ``linear_fc1``/``linear_fc2`` per expert: the layout the converters map and the one that runs on CPU.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    backend = resolve_backend(backend)
    kwargs = dict(num_experts=arch.num_experts, moe_grouped_gemm=False, qk_layernorm=arch.qk_norm)
    if backend == "te":
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**kwargs)
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm", **kwargs)

    attention_backend = resolve_attention_backend(attention_backend, backend)
    if attention_backend != "default":
        if attention_backend not in _ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {attention_backend!r}; known: {attention_backends()}")
        spec = copy.deepcopy(spec)  # the spec getters may share submodule objects between calls
        spec.submodules.self_attention.submodules.core_attention = _ATTENTION_BACKENDS[attention_backend]()
    return spec


def _torch_attention():
    from megatron_offgrpo.models.attention import TorchDotProductAttention

    return TorchDotProductAttention


def _local_attention():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    return DotProductAttention


def _te_attention():
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    return TEDotProductAttention


register_attention_backend("torch", _torch_attention)
register_attention_backend("local", _local_attention)
register_attention_backend("te", _te_attention)
