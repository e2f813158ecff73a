"""The weight mapping between Hugging Face checkpoints and Megatron-Core's ``GPTModel`` (local layer spec).

Pure tensor code, no I/O: the converters feed it a lazy getter over safetensors shards (HF side) or over a
loaded Megatron state dict (Megatron side) and consume the ``(name, tensor)`` pairs it yields one at a time,
so that at most one layer's tensors are alive here at once.

Layout facts this module encodes (each one is pinned by a test against ``transformers``):

* ``linear_qkv`` (fused): rows grouped per *query group* g = 0..G-1, each group being the q heads served by
  k/v head g (HF's ``repeat_kv`` assigns query head h to group h // (H/G)), then k head g, then v head g.
  The bias (Qwen2) follows the same row order.
* ``linear_fc1`` = [gate_proj; up_proj] (Megatron's SwiGLU applies the activation to the first half).
* Norms: ``input_layernorm`` <- ``input_layernorm``, ``pre_mlp_layernorm`` <- ``post_attention_layernorm``,
  ``q_layernorm``/``k_layernorm`` <- ``q_norm``/``k_norm`` (Qwen3), ``final_layernorm`` <- ``model.norm``.
* Embedding and output layer are zero-padded to the padded vocabulary on import and stripped on export.
  Tied models (``tie_word_embeddings``) have no ``lm_head`` on either side: Megatron shares the embedding.
* MoE (Qwen3-MoE): ``mlp.router.weight`` <- ``mlp.gate.weight`` (rows in expert order) and expert e's
  ``local_experts.e.linear_fc1/fc2`` <- ``mlp.experts.e.{gate,up,down}_proj`` (expert order kept).
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Tuple

import torch

from megatron_offgrpo.models.architecture import ModelArchitecture

__all__ = [
    "ShapeMismatchError",
    "MissingTensorError",
    "expected_hf_shapes",
    "expected_mcore_shapes",
    "pack_qkv",
    "unpack_qkv",
    "hf_to_mcore_tensors",
    "mcore_to_hf_tensors",
]

Getter = Callable[[str], torch.Tensor]
Pairs = Iterator[Tuple[str, torch.Tensor]]


class ShapeMismatchError(ValueError):
    """A tensor's shape differs from what the architecture implies (message names the tensor)."""


class MissingTensorError(KeyError):
    """A tensor the architecture needs is absent from the checkpoint (message names the tensor)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def _hf_layer_shapes(arch: ModelArchitecture, i: int) -> Dict[str, Tuple[int, ...]]:
    h, d = arch.hidden_size, arch.head_dim
    nq, nkv = arch.num_attention_heads, arch.num_query_groups
    p = f"model.layers.{i}."
    s: Dict[str, Tuple[int, ...]] = {
        p + "input_layernorm.weight": (h,),
        p + "post_attention_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (nq * d, h),
        p + "self_attn.k_proj.weight": (nkv * d, h),
        p + "self_attn.v_proj.weight": (nkv * d, h),
        p + "self_attn.o_proj.weight": (h, nq * d),
    }
    if arch.qkv_bias:
        s[p + "self_attn.q_proj.bias"] = (nq * d,)
        s[p + "self_attn.k_proj.bias"] = (nkv * d,)
        s[p + "self_attn.v_proj.bias"] = (nkv * d,)
    if arch.qk_norm:
        s[p + "self_attn.q_norm.weight"] = (d,)
        s[p + "self_attn.k_norm.weight"] = (d,)
    if arch.is_moe:
        f = arch.moe_ffn_hidden_size
        s[p + "mlp.gate.weight"] = (arch.num_experts, h)
        for e in range(arch.num_experts):
            q = f"{p}mlp.experts.{e}."
            s[q + "gate_proj.weight"] = (f, h)
            s[q + "up_proj.weight"] = (f, h)
            s[q + "down_proj.weight"] = (h, f)
    else:
        f = arch.ffn_hidden_size
        s[p + "mlp.gate_proj.weight"] = (f, h)
        s[p + "mlp.up_proj.weight"] = (f, h)
        s[p + "mlp.down_proj.weight"] = (h, f)
    return s


def expected_hf_shapes(arch: ModelArchitecture) -> Dict[str, Tuple[int, ...]]:
    """Every tensor of the canonical HF checkpoint of ``arch`` (per-expert MoE layout) with its shape."""
    s: Dict[str, Tuple[int, ...]] = {"model.embed_tokens.weight": (arch.vocab_size, arch.hidden_size)}
    for i in range(arch.num_layers):
        s.update(_hf_layer_shapes(arch, i))
    s["model.norm.weight"] = (arch.hidden_size,)
    if not arch.tie_word_embeddings:
        s["lm_head.weight"] = (arch.vocab_size, arch.hidden_size)
    return s


def expected_mcore_shapes(arch: ModelArchitecture, padded_vocab: int) -> Dict[str, Tuple[int, ...]]:
    """Every parameter of the TP=1 local-spec ``GPTModel`` of ``arch`` (``state_dict`` names) with its shape."""
    return {name: tuple(t.shape) for name, t in hf_to_mcore_tensors(arch, _shape_only_getter(arch), padded_vocab)}


def _shape_only_getter(arch: ModelArchitecture) -> Getter:
    shapes = expected_hf_shapes(arch)
    return lambda name: torch.empty(shapes[name], device="meta")


def _checked(get: Getter, name: str, shape: Tuple[int, ...]) -> torch.Tensor:
    t = get(name)
    if tuple(t.shape) != tuple(shape):
        raise ShapeMismatchError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


def pack_qkv(arch: ModelArchitecture, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HF q/k/v projections (weights ``[rows, hidden]`` or biases ``[rows]``) -> Megatron's fused rows."""
    g, d = arch.num_query_groups, arch.head_dim
    per_group = arch.num_attention_heads // g
    tail = q.shape[1:]
    parts = (q.reshape(g, per_group * d, *tail), k.reshape(g, d, *tail), v.reshape(g, d, *tail))
    return torch.cat(parts, dim=1).reshape(-1, *tail)


def unpack_qkv(arch: ModelArchitecture, qkv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_qkv`."""
    g, d = arch.num_query_groups, arch.head_dim
    per_group = arch.num_attention_heads // g
    tail = qkv.shape[1:]
    grouped = qkv.reshape(g, (per_group + 2) * d, *tail)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    out = t.new_zeros((rows, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


def hf_to_mcore_tensors(arch: ModelArchitecture, get: Getter, padded_vocab: int) -> Pairs:
    """Yield ``(megatron_state_dict_name, tensor)`` for the whole model, embedding first, layer by layer.

    ``get(hf_name)`` returns one HF tensor (lazily); shapes are validated against ``arch`` before use and a
    missing tensor raises :class:`MissingTensorError` (from the getter) naming it.
    """
    h = arch.hidden_size
    emb = _checked(get, "model.embed_tokens.weight", (arch.vocab_size, h))
    yield "embedding.word_embeddings.weight", _pad_rows(emb, padded_vocab)
    del emb
    for i in range(arch.num_layers):
        yield from _layer_to_mcore(arch, get, i)
    yield "decoder.final_layernorm.weight", _checked(get, "model.norm.weight", (h,))
    if not arch.tie_word_embeddings:
        head = _checked(get, "lm_head.weight", (arch.vocab_size, h))
        yield "output_layer.weight", _pad_rows(head, padded_vocab)


def _layer_to_mcore(arch: ModelArchitecture, get: Getter, i: int) -> Pairs:
    shapes = _hf_layer_shapes(arch, i)
    hp, mp = f"model.layers.{i}.", f"decoder.layers.{i}."

    def g(suffix: str) -> torch.Tensor:
        return _checked(get, hp + suffix, shapes[hp + suffix])

    yield mp + "input_layernorm.weight", g("input_layernorm.weight")
    qkv = [g(f"self_attn.{x}_proj.weight") for x in "qkv"]
    yield mp + "self_attention.linear_qkv.weight", pack_qkv(arch, *qkv)
    del qkv
    if arch.qkv_bias:
        yield mp + "self_attention.linear_qkv.bias", pack_qkv(arch, *[g(f"self_attn.{x}_proj.bias") for x in "qkv"])
    if arch.qk_norm:
        yield mp + "self_attention.q_layernorm.weight", g("self_attn.q_norm.weight")
        yield mp + "self_attention.k_layernorm.weight", g("self_attn.k_norm.weight")
    yield mp + "self_attention.linear_proj.weight", g("self_attn.o_proj.weight")
    yield mp + "pre_mlp_layernorm.weight", g("post_attention_layernorm.weight")
    if arch.is_moe:
        yield mp + "mlp.router.weight", g("mlp.gate.weight")
        for e in range(arch.num_experts):
            src, dst = f"mlp.experts.{e}.", f"{mp}mlp.experts.local_experts.{e}."
            yield dst + "linear_fc1.weight", torch.cat([g(src + "gate_proj.weight"), g(src + "up_proj.weight")])
            yield dst + "linear_fc2.weight", g(src + "down_proj.weight")
    else:
        yield mp + "mlp.linear_fc1.weight", torch.cat([g("mlp.gate_proj.weight"), g("mlp.up_proj.weight")])
        yield mp + "mlp.linear_fc2.weight", g("mlp.down_proj.weight")


def mcore_to_hf_tensors(arch: ModelArchitecture, get: Getter, padded_vocab: int) -> Pairs:
    """Yield ``(hf_name, tensor)`` for the canonical HF checkpoint, from a TP=1 Megatron state-dict getter.

    Padded vocabulary rows are stripped. Shapes of the Megatron tensors are validated first.
    """
    expected = expected_mcore_shapes(arch, padded_vocab)

    def g(name: str) -> torch.Tensor:
        return _checked(get, name, expected[name])

    yield "model.embed_tokens.weight", g("embedding.word_embeddings.weight")[: arch.vocab_size]
    for i in range(arch.num_layers):
        yield from _layer_to_hf(arch, g, i)
    yield "model.norm.weight", g("decoder.final_layernorm.weight")
    if not arch.tie_word_embeddings:
        yield "lm_head.weight", g("output_layer.weight")[: arch.vocab_size]


def _layer_to_hf(arch: ModelArchitecture, g: Getter, i: int) -> Pairs:
    hp, mp = f"model.layers.{i}.", f"decoder.layers.{i}."
    yield hp + "input_layernorm.weight", g(mp + "input_layernorm.weight")
    q, k, v = unpack_qkv(arch, g(mp + "self_attention.linear_qkv.weight"))
    yield hp + "self_attn.q_proj.weight", q
    yield hp + "self_attn.k_proj.weight", k
    yield hp + "self_attn.v_proj.weight", v
    if arch.qkv_bias:
        q, k, v = unpack_qkv(arch, g(mp + "self_attention.linear_qkv.bias"))
        yield hp + "self_attn.q_proj.bias", q
        yield hp + "self_attn.k_proj.bias", k
        yield hp + "self_attn.v_proj.bias", v
    if arch.qk_norm:
        yield hp + "self_attn.q_norm.weight", g(mp + "self_attention.q_layernorm.weight")
        yield hp + "self_attn.k_norm.weight", g(mp + "self_attention.k_layernorm.weight")
    yield hp + "self_attn.o_proj.weight", g(mp + "self_attention.linear_proj.weight")
    yield hp + "post_attention_layernorm.weight", g(mp + "pre_mlp_layernorm.weight")
    if arch.is_moe:
        yield hp + "mlp.gate.weight", g(mp + "mlp.router.weight")
        for e in range(arch.num_experts):
            src, dst = f"{mp}mlp.experts.local_experts.{e}.", f"{hp}mlp.experts.{e}."
            gate, up = torch.chunk(g(src + "linear_fc1.weight"), 2, dim=0)
            yield dst + "gate_proj.weight", gate
            yield dst + "up_proj.weight", up
            yield dst + "down_proj.weight", g(src + "linear_fc2.weight")
    else:
        gate, up = torch.chunk(g(mp + "mlp.linear_fc1.weight"), 2, dim=0)
        yield hp + "mlp.gate_proj.weight", gate
        yield hp + "mlp.up_proj.weight", up
        yield hp + "mlp.down_proj.weight", g(mp + "mlp.linear_fc2.weight")


def layer_of(mcore_name: str) -> int:
    """Decoder layer index of a Megatron parameter name, -1 for embedding / final norm / output layer."""
    parts = mcore_name.split(".")
    if len(parts) > 2 and parts[0] == "decoder" and parts[1] == "layers":
        return int(parts[2])
    return -1


def hf_names_by_layer(arch: ModelArchitecture) -> List[List[str]]:
    """HF tensor names grouped per decoder layer (index L = non-layer tensors), for progress reporting."""
    groups: List[List[str]] = [[] for _ in range(arch.num_layers + 1)]
    for name in expected_hf_shapes(arch):
        parts = name.split(".")
        idx = int(parts[2]) if name.startswith("model.layers.") else arch.num_layers
        groups[idx].append(name)
    return groups
