"""The weight mapping between Hugging Face checkpoints and Megatron-Core's ``GPTModel`` (local layer spec).

Pure tensor code, no I/O. The mapping is a table of :class:`TensorRecipe` s, one per output tensor: which
source tensors it reads (by name, with their expected shapes) and how it combines them. Every source tensor
feeds exactly one recipe on the HF -> Megatron side, so a streaming converter can build any output tensor on
its own, in whatever order its writer asks for them (:mod:`megatron_offgrpo.models.streaming`);
:func:`hf_to_mcore_tensors` / :func:`mcore_to_hf_tensors` walk the tables in order over a lazy getter.

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

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

from megatron_offgrpo.models.architecture import ModelArchitecture

__all__ = [
    "ShapeMismatchError",
    "MissingTensorError",
    "expected_hf_shapes",
    "expected_mcore_shapes",
    "pack_qkv",
    "unpack_qkv",
    "TensorRecipe",
    "hf_to_mcore_recipes",
    "mcore_to_hf_recipes",
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
    return {name: r.shape for name, r in hf_to_mcore_recipes(arch, padded_vocab).items()}


@dataclass(frozen=True)
class TensorRecipe:
    """How one output tensor is made: ``combine(*sources)``, each source read by name with the shape given.

    ``pad_rows`` (embedding / output layer on import) says that the output is the single source followed by
    zero rows up to ``pad_rows`` rows, so a converter may fill it block by block instead of calling ``combine``.
    """

    sources: Tuple[str, ...]
    source_shapes: Tuple[Tuple[int, ...], ...]
    shape: Tuple[int, ...]
    combine: Callable[..., torch.Tensor]
    pad_rows: Optional[int] = None


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


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


def hf_to_mcore_recipes(arch: ModelArchitecture, padded_vocab: int) -> Dict[str, TensorRecipe]:
    """Megatron ``state_dict`` name -> its recipe over HF tensors, embedding first, layer by layer (HF order)."""
    h = arch.hidden_size
    hf = expected_hf_shapes(arch)
    out: Dict[str, TensorRecipe] = {}

    def add(name: str, sources: Tuple[str, ...], shape: Tuple[int, ...], combine=_identity, pad_rows=None) -> None:
        out[name] = TensorRecipe(sources, tuple(hf[s] for s in sources), tuple(shape), combine, pad_rows)

    pad = lambda t: _pad_rows(t, padded_vocab)  # noqa: E731
    add("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), (padded_vocab, h), pad, padded_vocab)
    for i in range(arch.num_layers):
        _layer_recipes(arch, i, hf, add)
    add("decoder.final_layernorm.weight", ("model.norm.weight",), (h,))
    if not arch.tie_word_embeddings:
        add("output_layer.weight", ("lm_head.weight",), (padded_vocab, h), pad, padded_vocab)
    return out


def _layer_recipes(arch: ModelArchitecture, i: int, hf: Dict[str, Tuple[int, ...]], add) -> None:
    hp, mp = f"model.layers.{i}.", f"decoder.layers.{i}."
    qkv_rows = (arch.num_attention_heads + 2 * arch.num_query_groups) * arch.head_dim
    pack = lambda q, k, v: pack_qkv(arch, q, k, v)  # noqa: E731
    fuse = lambda gate, up: torch.cat([gate, up])  # noqa: E731
    same = lambda name: hf[name]  # noqa: E731

    add(mp + "input_layernorm.weight", (hp + "input_layernorm.weight",), same(hp + "input_layernorm.weight"))
    add(mp + "self_attention.linear_qkv.weight", tuple(f"{hp}self_attn.{x}_proj.weight" for x in "qkv"),
        (qkv_rows, arch.hidden_size), pack)  # fmt: skip
    if arch.qkv_bias:
        add(mp + "self_attention.linear_qkv.bias", tuple(f"{hp}self_attn.{x}_proj.bias" for x in "qkv"), (qkv_rows,),
            pack)  # fmt: skip
    if arch.qk_norm:
        add(mp + "self_attention.q_layernorm.weight", (hp + "self_attn.q_norm.weight",), (arch.head_dim,))
        add(mp + "self_attention.k_layernorm.weight", (hp + "self_attn.k_norm.weight",), (arch.head_dim,))
    o_proj = hp + "self_attn.o_proj.weight"
    add(mp + "self_attention.linear_proj.weight", (o_proj,), same(o_proj))
    add(mp + "pre_mlp_layernorm.weight", (hp + "post_attention_layernorm.weight",), (arch.hidden_size,))
    if arch.is_moe:
        add(mp + "mlp.router.weight", (hp + "mlp.gate.weight",), same(hp + "mlp.gate.weight"))
        f = arch.moe_ffn_hidden_size
        for e in range(arch.num_experts):
            src, dst = f"{hp}mlp.experts.{e}.", f"{mp}mlp.experts.local_experts.{e}."
            add(dst + "linear_fc1.weight", (src + "gate_proj.weight", src + "up_proj.weight"),
                (2 * f, arch.hidden_size), fuse)  # fmt: skip
            add(dst + "linear_fc2.weight", (src + "down_proj.weight",), same(src + "down_proj.weight"))
    else:
        f = arch.ffn_hidden_size
        add(mp + "mlp.linear_fc1.weight", (hp + "mlp.gate_proj.weight", hp + "mlp.up_proj.weight"),
            (2 * f, arch.hidden_size), fuse)  # fmt: skip
        add(mp + "mlp.linear_fc2.weight", (hp + "mlp.down_proj.weight",), same(hp + "mlp.down_proj.weight"))


def mcore_to_hf_recipes(arch: ModelArchitecture, padded_vocab: int) -> Dict[str, TensorRecipe]:
    """HF tensor name -> its recipe over TP=1 Megatron ``state_dict`` tensors, in Megatron order.

    Tensors split from one Megatron tensor (q/k/v from ``linear_qkv``, gate/up from ``linear_fc1``) are
    consecutive, so a reader that keeps the last source alive reads each Megatron tensor once.
    """
    mc = expected_mcore_shapes(arch, padded_vocab)
    hf = expected_hf_shapes(arch)
    out: Dict[str, TensorRecipe] = {}
    for mname, r in hf_to_mcore_recipes(arch, padded_vocab).items():
        n = len(r.sources)
        for j, hname in enumerate(r.sources):
            if r.pad_rows:
                split = _strip_rows(arch.vocab_size)
            elif n == 1:
                split = _identity
            elif n == 3:
                split = _unpack_one(arch, j)
            else:
                split = _chunk_one(j)
            out[hname] = TensorRecipe((mname,), (mc[mname],), hf[hname], split)
    return out


def _strip_rows(rows: int):
    return lambda t: t[:rows]


def _unpack_one(arch: ModelArchitecture, j: int):
    """Part j (q, k or v) of :func:`unpack_qkv`, without materialising the other two."""
    g, d = arch.num_query_groups, arch.head_dim
    sizes = [arch.num_attention_heads // g * d, d, d]

    def part(qkv: torch.Tensor) -> torch.Tensor:
        tail = qkv.shape[1:]
        return torch.split(qkv.reshape(g, sum(sizes), *tail), sizes, dim=1)[j].reshape(-1, *tail)

    return part


def _chunk_one(j: int):
    return lambda fc1: torch.chunk(fc1, 2, dim=0)[j]


def hf_to_mcore_tensors(arch: ModelArchitecture, get: Getter, padded_vocab: int) -> Pairs:
    """Yield ``(megatron_state_dict_name, tensor)`` for the whole model, embedding first, layer by layer.

    ``get(hf_name)`` returns one HF tensor (lazily); shapes are validated against ``arch`` before use and a
    missing tensor raises :class:`MissingTensorError` (from the getter) naming it.
    """
    for name, recipe in hf_to_mcore_recipes(arch, padded_vocab).items():
        sources = [_checked(get, s, shape) for s, shape in zip(recipe.sources, recipe.source_shapes)]
        yield name, recipe.combine(*sources)
        del sources


def mcore_to_hf_tensors(arch: ModelArchitecture, get: Getter, padded_vocab: int) -> Pairs:
    """Yield ``(hf_name, tensor)`` for the canonical HF checkpoint, from a TP=1 Megatron state-dict getter.

    Padded vocabulary rows are stripped. Shapes of the Megatron tensors are validated first. Each Megatron
    tensor is read once (the last one read is kept while the HF tensors split from it are made).
    """
    cache: Dict[str, torch.Tensor] = {}
    for name, recipe in mcore_to_hf_recipes(arch, padded_vocab).items():
        cache = {s: cache[s] if s in cache else _checked(get, s, shape)
                 for s, shape in zip(recipe.sources, recipe.source_shapes)}  # fmt: skip
        yield name, recipe.combine(*(cache[s] for s in recipe.sources))
