"""Streaming HF <-> Megatron conversion: the same checkpoint as saving a built model, a bounded peak memory, and
no output until it is complete.

Oracles, each independent of the converter:

* the previous implementation (``streaming=False``: the whole TP=1 model filled and saved / loaded by Megatron's
  own ``dist_checkpointing``), compared file by file: the DCP metadata (keys, global shapes, dtypes, the set of
  stored chunks, the ``_extra_state`` objects), ``common.pt`` and ``metadata.json``;
* the global tensors built here, by hand, from the ``transformers`` model's ``state_dict()`` (q/k/v rows per
  query group with an explicit loop over heads, gate/up stacked, zero vocabulary padding, layer- and
  expert-stacked keys), read back with torch DCP's own loader;
* ``transformers`` logits of the source model, against Megatron loading the streamed checkpoint at TP=2 and
  EP=2, and the parameters each rank holds at EP=2 and PP=2 (the layouts the trainer uses);
* the source safetensors, byte for byte, after exporting checkpoints that Megatron itself saved at TP=2 / EP=2
  (stored chunks that are not whole parameters).

The memory test runs each conversion in a subprocess that measures its own interpreter baseline (after the
imports and a warm-up conversion) and its peak RSS, on a model whose in-memory conversion is far above the
bound (checked too, as the negative control).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_offgrpo.utils.distributed import run_on_ranks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO, "tools", "checkpoint")
VOCAB, PADDED, SEQ, TOL = 200, 256, 12, 1e-4

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
FAMILIES = {
    "qwen2_tied": ("Qwen2", dict(tie_word_embeddings=True)),
    "qwen2_untied": ("Qwen2", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3", dict(head_dim=32, tie_word_embeddings=False)),
    "qwen3_moe": ("Qwen3Moe", dict(head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                   norm_topk_prob=True, tie_word_embeddings=False)),
}  # fmt: skip


def _build_hf(family: str, seed: int, dtype=torch.float32, **overrides):
    """A random ``transformers`` model: every weight random (norms around 1, biases around 0)."""
    import transformers

    prefix, extra = FAMILIES[family]
    config = getattr(transformers, prefix + "Config")(**{**COMMON, **extra, **overrides})
    model = getattr(transformers, prefix + "ForCausalLM")(config).eval().to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if p.dim() == 1 and "norm" in name else 0.0
            std = 0.5 if name.endswith("mlp.gate.weight") else (0.2 if p.dim() == 1 else 0.1)
            p.copy_(base + std * torch.randn(p.shape, generator=g))
    return model


def _read_dir(d: str) -> dict:
    out = {}
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        out.update(load_file(f))
    return out


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))


# ----------------------------------------------------------------------------------------------------------------
# The independent oracle: Megatron's global checkpoint tensors from the HF state dict, by hand


def _expected_global_tensors(sd: dict, cfg) -> dict:
    """Checkpoint key -> global tensor, as Megatron's TP=1 ``sharded_state_dict`` stores a GPT model."""
    L, H = cfg.num_hidden_layers, cfg.hidden_size
    nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or H // nq
    moe = getattr(cfg, "num_experts", None)

    def pad(t):
        out = torch.zeros((PADDED, *t.shape[1:]), dtype=t.dtype)
        out[: t.shape[0]] = t
        return out

    def qkv(i, kind):
        p = f"model.layers.{i}.self_attn."
        q, k, v = (sd[f"{p}{x}_proj.{kind}"] for x in "qkv")
        rows = []
        for g in range(nkv):  # query group g: its q heads (HF repeat_kv: head h -> group h // (nq / nkv)), k_g, v_g
            for h in range(g * nq // nkv, (g + 1) * nq // nkv):
                rows.append(q[h * d : (h + 1) * d])
            rows += [k[g * d : (g + 1) * d], v[g * d : (g + 1) * d]]
        return torch.cat(rows)

    layer = lambda f: torch.stack([f(i) for i in range(L)])  # noqa: E731
    hf = lambda i, n: sd[f"model.layers.{i}.{n}"]  # noqa: E731
    out = {
        "embedding.word_embeddings.weight": pad(sd["model.embed_tokens.weight"]),
        "decoder.final_layernorm.weight": sd["model.norm.weight"],
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": layer(lambda i: hf(i, "input_layernorm.weight")),
        "decoder.layers.self_attention.linear_qkv.weight": layer(lambda i: qkv(i, "weight")),
        "decoder.layers.self_attention.linear_proj.weight": layer(lambda i: hf(i, "self_attn.o_proj.weight")),
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": layer(lambda i: hf(i, "post_attention_layernorm.weight")),
    }
    if not cfg.tie_word_embeddings:
        out["output_layer.weight"] = pad(sd["lm_head.weight"])
    if "model.layers.0.self_attn.q_proj.bias" in sd:
        out["decoder.layers.self_attention.linear_qkv.bias"] = layer(lambda i: qkv(i, "bias"))
    if "model.layers.0.self_attn.q_norm.weight" in sd:
        out["decoder.layers.self_attention.q_layernorm.weight"] = layer(lambda i: hf(i, "self_attn.q_norm.weight"))
        out["decoder.layers.self_attention.k_layernorm.weight"] = layer(lambda i: hf(i, "self_attn.k_norm.weight"))
    if moe:
        out["decoder.layers.mlp.router.weight"] = layer(lambda i: hf(i, "mlp.gate.weight"))
        out["decoder.layers.mlp.experts.experts.linear_fc1.weight"] = layer(
            lambda i: torch.stack([_expert(sd, i, j)[0] for j in range(moe)]))  # fmt: skip
        out["decoder.layers.mlp.experts.experts.linear_fc2.weight"] = layer(
            lambda i: torch.stack([_expert(sd, i, j)[1] for j in range(moe)]))  # fmt: skip
    else:
        out["decoder.layers.mlp.linear_fc1.weight"] = layer(
            lambda i: torch.cat([hf(i, "mlp.gate_proj.weight"), hf(i, "mlp.up_proj.weight")]))  # fmt: skip
        out["decoder.layers.mlp.linear_fc2.weight"] = layer(lambda i: hf(i, "mlp.down_proj.weight"))
    return out


def _expert(sd: dict, i: int, j: int):
    """(``[gate; up]``, ``down``) of expert j of layer i, from either HF layout of a Qwen3-MoE state dict.

    transformers 5 holds the experts fused in memory (``gate_up_proj[j]`` is the ``[2f, hidden]`` matrix its
    forward applies and chunks into gate, up); checkpoints on disk keep one tensor per expert and projection.
    """
    p = f"model.layers.{i}.mlp.experts."
    if p + "gate_up_proj" in sd:
        return sd[p + "gate_up_proj"][j], sd[p + "down_proj"][j]
    return torch.cat([sd[f"{p}{j}.gate_proj.weight"], sd[f"{p}{j}.up_proj.weight"]]), sd[f"{p}{j}.down_proj.weight"]


def _dcp_metadata(d: str):
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(d).read_metadata()


def _dcp_tensors(d: str) -> dict:
    """Every tensor key of a checkpoint as one global tensor, read by torch DCP's own loader."""
    import torch.distributed.checkpoint as dcp

    md = _dcp_metadata(d)
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
             for k, m in md.state_dict_metadata.items() if hasattr(m, "chunks")}  # fmt: skip
    dcp.load(state, checkpoint_id=d, no_dist=True)
    return state


def _chunk_summary(d: str) -> dict:
    """Key -> (kind, global shape, dtype, set of stored chunks): what a loader sees of a checkpoint's layout."""
    out = {}
    for k, m in _dcp_metadata(d).state_dict_metadata.items():
        if hasattr(m, "chunks"):
            chunks = frozenset((tuple(c.offsets), tuple(c.sizes)) for c in m.chunks)
            out[k] = ("tensor", tuple(m.size), m.properties.dtype, chunks)
        else:
            out[k] = ("bytes",)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Workers (module level: run_on_ranks pickles them by reference)


def _convert_worker(rank: int, world: int, root: str) -> None:
    from megatron_offgrpo.models.converter import convert_hf_to_mcore, convert_mcore_to_hf

    for fam in FAMILIES:
        hf, d = os.path.join(root, fam, "hf"), os.path.join(root, fam)
        convert_hf_to_mcore(hf, os.path.join(d, "stream"), tp=2, progress=False)
        convert_hf_to_mcore(hf, os.path.join(d, "legacy"), tp=2, progress=False, streaming=False)
        convert_mcore_to_hf(os.path.join(d, "stream"), hf, os.path.join(d, "export"), max_shard_bytes=48 * 1024,
                            progress=False)  # fmt: skip
        convert_mcore_to_hf(os.path.join(d, "legacy"), hf, os.path.join(d, "export_legacy"),
                            max_shard_bytes=48 * 1024, progress=False, streaming=False)  # fmt: skip
    # Several processes (the 30B-MoE case): the layers split over two writers in one DCP world, the shards over
    # two exporters.
    for fam in ("qwen3_moe",):
        hf, d = os.path.join(root, fam, "hf"), os.path.join(root, fam)
        convert_hf_to_mcore(hf, os.path.join(d, "stream_w2"), tp=2, progress=False, workers=2)
        convert_mcore_to_hf(os.path.join(d, "stream"), hf, os.path.join(d, "export_w2"), max_shard_bytes=48 * 1024,
                            progress=False, workers=2)  # fmt: skip
    # bf16 from an fp32 source: one rounding per tensor (the local spec's norms stay float32, as in the reference).
    hf = os.path.join(root, "qwen3", "hf")
    convert_hf_to_mcore(hf, os.path.join(root, "qwen3", "stream_bf16"), dtype="bf16", progress=False)
    convert_hf_to_mcore(hf, os.path.join(root, "qwen3", "legacy_bf16"), dtype="bf16", progress=False, streaming=False)
    convert_mcore_to_hf(os.path.join(root, "qwen3", "stream_bf16"), hf, os.path.join(root, "qwen3", "export_bf16"),
                        progress=False)  # fmt: skip


def _layout_worker(rank: int, world: int, root: str) -> dict:
    """Load the streamed checkpoints at TP=2, EP=2 and PP=2; logits / local parameters; save at TP=2 and EP=2."""
    from megatron.core import parallel_state

    from megatron_offgrpo.models import (
        build_gpt_model, build_transformer_config, checkpoint_padded_vocab_size, load_model_checkpoint,
        model_config_from_hf, save_model_checkpoint,
    )  # fmt: skip
    from megatron_offgrpo.models.parity import gather_real_vocab_logits, megatron_vocab_parallel_logits
    from megatron_offgrpo.utils.cpu_backend import initialize_cpu_model_parallel

    tokens = _tokens()
    res: dict = {}

    def load(fam, pre=True, post=True, **layout):
        ckpt = os.path.join(root, fam, "stream")
        arch = model_config_from_hf(os.path.join(root, fam, "hf"))
        model = build_gpt_model(arch, build_transformer_config(arch, **layout), pre, post,
                                vocab_size=checkpoint_padded_vocab_size(ckpt), backend="local")  # fmt: skip
        load_model_checkpoint(model, ckpt)
        return arch, model

    def relayout(**kw):
        parallel_state.destroy_model_parallel()
        initialize_cpu_model_parallel(**kw)

    initialize_cpu_model_parallel(tensor_model_parallel_size=2)
    for fam in ("qwen2_untied", "qwen3"):
        arch, model = load(fam, tp=2)
        res[f"tp2/{fam}"] = gather_real_vocab_logits(megatron_vocab_parallel_logits(model, tokens), arch.vocab_size)
        if fam == "qwen3":
            save_model_checkpoint(model, os.path.join(root, fam, "saved_tp2"))

    relayout(expert_model_parallel_size=2)
    arch, model = load("qwen3_moe", ep=2)
    res["ep2/qwen3_moe"] = gather_real_vocab_logits(megatron_vocab_parallel_logits(model, tokens), arch.vocab_size)
    res["ep2_local_experts"] = {
        f"{layer}.{rank * 2 + j}": (e.linear_fc1.weight.detach().clone(), e.linear_fc2.weight.detach().clone())
        for layer, block in enumerate(model.decoder.layers) for j, e in enumerate(block.mlp.experts.local_experts)
    }  # fmt: skip
    save_model_checkpoint(model, os.path.join(root, "qwen3_moe", "saved_ep2"))

    relayout(pipeline_model_parallel_size=2)  # stage r holds layer r; tied: the last stage's output layer too
    arch, model = load("qwen2_tied", pre=rank == 0, post=rank == 1, pp=2)
    res["pp2_state"] = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    return res


def _export_saved_worker(rank: int, world: int, root: str) -> None:
    from megatron_offgrpo.models.converter import convert_mcore_to_hf

    for fam, saved in (("qwen3", "saved_tp2"), ("qwen3_moe", "saved_ep2")):
        convert_mcore_to_hf(os.path.join(root, fam, saved), os.path.join(root, fam, "hf"),
                            os.path.join(root, fam, f"export_{saved}"), progress=False)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Source models (several input shards each), their logits, and every conversion of them."""
    root = str(tmp_path_factory.mktemp("streaming"))
    tokens = _tokens()
    logits, states, configs = {}, {}, {}
    for seed, fam in enumerate(FAMILIES):
        model = _build_hf(fam, seed)
        model.save_pretrained(os.path.join(root, fam, "hf"), max_shard_size="40KB")  # shards switch mid-layer
        with torch.no_grad():
            logits[fam] = model(input_ids=tokens).logits.float()
        states[fam] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        configs[fam] = model.config
    run_on_ranks(_convert_worker, 1, root)
    return {"root": root, "logits": logits, "states": states, "configs": configs}


@pytest.fixture(scope="module")
def layouts(work):
    results = run_on_ranks(_layout_worker, 2, work["root"])
    run_on_ranks(_export_saved_worker, 1, work["root"])
    return results


def _assert_close(reference: torch.Tensor, other: torch.Tensor) -> None:
    assert reference.shape == other.shape, (reference.shape, other.shape)
    assert (reference - other).abs().max().item() <= TOL
    assert torch.equal(reference.argmax(-1), other.argmax(-1))


# ----------------------------------------------------------------------------------------------------------------
# The checkpoint: the one Megatron writes for a built model, holding the tensors the mapping defines


@pytest.mark.parametrize("family", list(FAMILIES))
def test_streamed_checkpoint_has_megatrons_layout(work, family):
    d = os.path.join(work["root"], family)
    stream, legacy = _chunk_summary(os.path.join(d, "stream")), _chunk_summary(os.path.join(d, "legacy"))
    assert stream == legacy
    assert any(v[0] == "bytes" for v in stream.values())  # the _extra_state objects are there
    for name in ("common.pt", "metadata.json"):
        with open(os.path.join(d, "stream", name), "rb") as a, open(os.path.join(d, "legacy", name), "rb") as b:
            assert a.read() == b.read(), name
    metas = []
    for ckpt in ("stream", "legacy"):
        with open(os.path.join(d, ckpt, "offgrpo_model.json")) as f:
            metas.append(json.load(f))
    assert metas[0] == metas[1]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_streamed_tensors_equal_hand_mapped_hf_state_dict(work, family):
    d = os.path.join(work["root"], family)
    expected = _expected_global_tensors(work["states"][family], work["configs"][family])
    for ckpt in ("stream", "legacy"):  # the reference path holds them too: the oracle itself is right
        got = _dcp_tensors(os.path.join(d, ckpt))
        assert sorted(got) == sorted(expected), ckpt
        for key, tensor in expected.items():
            assert got[key].dtype == torch.float32 and torch.equal(got[key], tensor), (ckpt, key)


@pytest.mark.parametrize("family", ["qwen3_moe"])
def test_two_writer_processes_write_the_same_checkpoint(work, family):
    d = os.path.join(work["root"], family)
    assert _chunk_summary(os.path.join(d, "stream_w2")) == _chunk_summary(os.path.join(d, "stream"))
    assert len(glob.glob(os.path.join(d, "stream_w2", "*.distcp"))) == 2  # really written by two ranks
    a, b = _dcp_tensors(os.path.join(d, "stream_w2")), _dcp_tensors(os.path.join(d, "stream"))
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_is_bit_exact_and_matches_the_legacy_export(work, family):
    d = os.path.join(work["root"], family)
    src = _read_dir(os.path.join(d, "hf"))
    out, legacy = _read_dir(os.path.join(d, "export")), _read_dir(os.path.join(d, "export_legacy"))
    assert sorted(out) == sorted(src) == sorted(legacy)
    for name, t in src.items():
        assert out[name].dtype == t.dtype and torch.equal(out[name], t), name
    for name in os.listdir(os.path.join(d, "export")):  # the very same files, index and shard split included
        with open(os.path.join(d, "export", name), "rb") as a, open(os.path.join(d, "export_legacy", name), "rb") as b:
            assert a.read() == b.read(), name


@pytest.mark.parametrize("family", ["qwen3_moe"])
def test_two_exporter_processes_write_the_same_files(work, family):
    d = os.path.join(work["root"], family)
    names = sorted(os.listdir(os.path.join(d, "export")))
    assert names == sorted(os.listdir(os.path.join(d, "export_w2"))) and len(names) > 4
    for name in names:
        with open(os.path.join(d, "export", name), "rb") as a, open(os.path.join(d, "export_w2", name), "rb") as b:
            assert a.read() == b.read(), name


def test_streamed_export_loads_in_transformers(work):
    from transformers import AutoModelForCausalLM

    d = os.path.join(work["root"], "qwen3_moe", "export")
    model, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=_tokens()).logits.float(), work["logits"]["qwen3_moe"])


def test_bf16_streaming_rounds_once(work):
    d = os.path.join(work["root"], "qwen3")
    src = _read_dir(os.path.join(d, "hf"))
    got = _dcp_tensors(os.path.join(d, "stream_bf16"))
    expected = _expected_global_tensors({k: v.to(torch.bfloat16) for k, v in src.items()}, work["configs"]["qwen3"])
    exact = _expected_global_tensors(src, work["configs"]["qwen3"])
    for key, tensor in expected.items():
        # Megatron's local-spec norms keep float32 weights in a bf16 model: stored as float32, unrounded, as the
        # reference path stores them (the layouts, dtypes included, are compared just below).
        if "norm" in key:
            assert got[key].dtype == torch.float32 and torch.equal(got[key], exact[key]), key
        else:
            assert got[key].dtype == torch.bfloat16 and torch.equal(got[key], tensor), key
    assert _chunk_summary(os.path.join(d, "stream_bf16")) == _chunk_summary(os.path.join(d, "legacy_bf16"))
    out = _read_dir(os.path.join(work["root"], "qwen3", "export_bf16"))
    assert all(torch.equal(out[k], v.to(torch.bfloat16)) for k, v in src.items())


# ----------------------------------------------------------------------------------------------------------------
# Loaded by Megatron at the trainer's layouts; exported from what Megatron saved at them


@pytest.mark.parametrize("key", ["tp2/qwen2_untied", "tp2/qwen3", "ep2/qwen3_moe"])
def test_streamed_checkpoint_loads_at_tp2_and_ep2(work, layouts, key):
    for rank_result in layouts:
        _assert_close(work["logits"][key.split("/")[1]], rank_result[key])


def test_ep2_ranks_hold_their_experts(work, layouts):
    sd = work["states"]["qwen3_moe"]
    seen = set()
    for rank_result in layouts:
        for name, (fc1, fc2) in rank_result["ep2_local_experts"].items():
            layer, e = map(int, name.split("."))
            want_fc1, want_fc2 = _expert(sd, layer, e)
            assert torch.equal(fc1, want_fc1) and torch.equal(fc2, want_fc2), name
            seen.add(name)
    assert len(seen) == 2 * 4  # every (layer, expert) on exactly one of the two ranks


def test_pp2_stages_hold_their_layers(work, layouts):
    """PP=2, tied embeddings: stage 0 has layer 0 and the embedding, stage 1 layer 1, the norm and the head."""
    expected = _expected_global_tensors(work["states"]["qwen2_tied"], work["configs"]["qwen2_tied"])
    stage0, stage1 = layouts[0]["pp2_state"], layouts[1]["pp2_state"]
    assert torch.equal(stage0["embedding.word_embeddings.weight"], expected["embedding.word_embeddings.weight"])
    assert torch.equal(stage1["output_layer.weight"], expected["embedding.word_embeddings.weight"])
    assert torch.equal(stage1["decoder.final_layernorm.weight"], expected["decoder.final_layernorm.weight"])
    for stage, layer in ((stage0, 0), (stage1, 1)):  # local layer index 0 on both stages
        assert torch.equal(stage["decoder.layers.0.self_attention.linear_qkv.weight"],
                           expected["decoder.layers.self_attention.linear_qkv.weight"][layer])  # fmt: skip
        assert torch.equal(stage["decoder.layers.0.mlp.linear_fc1.weight"],
                           expected["decoder.layers.mlp.linear_fc1.weight"][layer])  # fmt: skip


@pytest.mark.parametrize("family, saved", [("qwen3", "saved_tp2"), ("qwen3_moe", "saved_ep2")])
def test_export_of_checkpoints_saved_at_tp2_and_ep2(work, layouts, family, saved):
    """Stored chunks that are halves of a parameter (TP=2) or other ranks' experts (EP=2) read back exactly."""
    d = os.path.join(work["root"], family)
    summary = _chunk_summary(os.path.join(d, saved))
    if saved == "saved_tp2":  # really split: two chunks per layer of linear_qkv, four of linear_fc1
        assert len(summary["decoder.layers.self_attention.linear_qkv.weight"][3]) == 2 * 2
        assert len(summary["decoder.layers.mlp.linear_fc1.weight"][3]) == 2 * 4
    src, out = _read_dir(os.path.join(d, "hf")), _read_dir(os.path.join(d, f"export_{saved}"))
    assert sorted(src) == sorted(out) and all(torch.equal(src[k], out[k]) for k in src)


# ----------------------------------------------------------------------------------------------------------------
# Peak memory


_MEMORY_CHILD = r"""
import json, os, sys
import psutil
import megatron.core.dist_checkpointing, torch.distributed.checkpoint, transformers  # noqa: F401
from megatron_offgrpo.models.converter import convert_hf_to_mcore, convert_mcore_to_hf
direction, streaming, shard_bytes, warm, big = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), *sys.argv[4:6]

def convert(hf):  # <hf>_mc is the model's checkpoint; a conversion's output goes to <hf>_out
    if direction == "prepare":
        convert_hf_to_mcore(hf, hf + "_mc", progress=False)
    elif direction == "hf_to_mcore":
        convert_hf_to_mcore(hf, hf + "_out", progress=False, streaming=streaming)
    else:
        convert_mcore_to_hf(hf + "_mc", hf, hf + "_out", max_shard_bytes=shard_bytes, progress=False,
                            streaming=streaming)

convert(warm)  # imports, the process group, Megatron's lazily built state: all part of the baseline
baseline = psutil.Process().memory_info().rss
# The peak is this process's high-water mark (VmHWM), reset here. Not ru_maxrss: a child started by vfork +
# exec inherits the parent's high-water mark in it (the test process holds the model it wrote).
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
convert(big)
with open("/proc/self/status") as f:  # psutil has no field for VmHWM
    peak = 1024 * int(next(line for line in f if line.startswith("VmHWM:")).split()[1])
print("RESULT " + json.dumps({"baseline": baseline, "peak": peak}))
"""
MEMORY_SHARD = 64 * 10**6  # "64MB", as transformers counts


def _run_memory_child(direction: str, streaming: bool, paths: dict) -> dict:
    import shutil

    for p in paths.values():
        shutil.rmtree(p + "_out", ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, direction, "1" if streaming else "0", str(MEMORY_SHARD),
                        paths["warm"], paths["big"]], capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads([x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1][len("RESULT ") :])


@pytest.fixture(scope="module")
def memory_model(tmp_path_factory):
    """A bf16 Qwen3 of 0.34 GB in 64 MB shards (and a tiny one to warm up), with their converted checkpoints."""
    from megatron_offgrpo.models import model_config_from_hf
    from megatron_offgrpo.models.conversion import expected_hf_shapes

    root = str(tmp_path_factory.mktemp("memory"))
    big = dict(vocab_size=32768, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
               num_key_value_heads=8, head_dim=64, tie_word_embeddings=True)  # fmt: skip
    paths = {"warm": os.path.join(root, "warm"), "big": os.path.join(root, "big")}
    for tag, kw in (("warm", {}), ("big", big)):
        model = _build_hf("qwen3", 7, dtype=torch.bfloat16, **kw)
        model.save_pretrained(paths[tag], max_shard_size=MEMORY_SHARD)
        del model
    _run_memory_child("prepare", True, paths)  # the checkpoints the export direction reads
    arch = model_config_from_hf(paths["big"])
    shapes = expected_hf_shapes(arch)
    layer = sum(2 * torch.Size(s).numel() for n, s in shapes.items() if n.startswith("model.layers.0."))
    files = glob.glob(os.path.join(paths["big"], "*.safetensors"))
    largest = max(max(map(os.path.getsize, files)), MEMORY_SHARD)  # input shards; the export's are <= the limit
    return {"paths": paths, "bound": 1.5 * largest + layer, "model_bytes": sum(map(os.path.getsize, files))}


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS is read from Linux's /proc")
@pytest.mark.parametrize("direction", ["hf_to_mcore", "mcore_to_hf"])
def test_streaming_peak_rss_within_target(memory_model, direction):
    """Peak RSS - baseline <= 1.5 x largest shard + one layer; the in-memory path is far above on this model."""
    m = memory_model
    assert m["model_bytes"] > 2 * m["bound"]  # a model the bound could not hold
    new = _run_memory_child(direction, True, m["paths"])
    net = new["peak"] - new["baseline"]
    print(f"{direction}: streaming peak - baseline {net / 2**20:.0f} MiB, bound {m['bound'] / 2**20:.0f} MiB, model "
          f"{m['model_bytes'] / 2**20:.0f} MiB, baseline {new['baseline'] / 2**20:.0f} MiB")  # fmt: skip
    assert net <= m["bound"], f"{direction}: {net / 2**20:.0f} MiB over the baseline > {m['bound'] / 2**20:.0f} MiB"
    if direction == "hf_to_mcore":  # negative control: the bound is meaningful on this model
        old = _run_memory_child(direction, False, m["paths"])
        print(f"{direction}: in-memory peak - baseline {(old['peak'] - old['baseline']) / 2**20:.0f} MiB")
        assert old["peak"] - old["baseline"] > 2 * m["bound"], (old, m["bound"])


# ----------------------------------------------------------------------------------------------------------------
# A killed conversion leaves no output; the next run cleans up after it


def _cli(script: str, *args: str, kill_at: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MEGATRON_OFFGRPO_TEST_KILL_AT=kill_at)
    return subprocess.run([sys.executable, os.path.join(TOOLS, script), *args, "--no-progress"], capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip


@pytest.mark.parametrize("point", ["convert:tensor_written", "convert:before_publish"])
def test_killed_conversion_leaves_no_checkpoint(work, tmp_path, point):
    hf = os.path.join(work["root"], "qwen3", "hf")
    out = str(tmp_path / "mc")
    p = _cli("hf_to_mcore.py", "--hf-dir", hf, "--out", out, kill_at=point)
    assert p.returncode == -9, (p.returncode, p.stderr[-2000:])
    assert not os.path.exists(out)  # nothing at the output path, whatever was written
    leftovers = glob.glob(out + ".tmp*")
    assert len(leftovers) == 1 and os.listdir(leftovers[0])  # the partial work is under the temporary name
    p = _cli("hf_to_mcore.py", "--hf-dir", hf, "--out", out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not glob.glob(out + ".tmp*")  # the dead process's leftovers were removed
    assert _chunk_summary(out) == _chunk_summary(os.path.join(work["root"], "qwen3", "stream"))


def test_killed_export_leaves_no_model(work, tmp_path):
    hf = os.path.join(work["root"], "qwen3", "hf")
    ckpt, out = os.path.join(work["root"], "qwen3", "stream"), str(tmp_path / "hf")
    p = _cli("mcore_to_hf.py", "--ckpt", ckpt, "--hf-template", hf, "--out", out, kill_at="convert:tensor_written")
    assert p.returncode == -9, (p.returncode, p.stderr[-2000:])
    assert not os.path.exists(out) and len(glob.glob(out + ".tmp*")) == 1
    p = _cli("mcore_to_hf.py", "--ckpt", ckpt, "--hf-template", hf, "--out", out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not glob.glob(out + ".tmp*")
    src, got = _read_dir(hf), _read_dir(out)
    assert sorted(src) == sorted(got) and all(torch.equal(src[k], got[k]) for k in src)


# ----------------------------------------------------------------------------------------------------------------
# Pieces, in-process


def test_shard_writer_output_reads_back_with_safetensors(tmp_path):
    from safetensors import safe_open

    from megatron_offgrpo.models.safetensors_io import SafetensorsShardWriter, check_safetensors_file

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
               "c": torch.randn(2, 2, 2, generator=g).to(torch.float16),
               "d": torch.randn(4, 6, generator=g)[:, ::2]}  # fmt: skip
    path = str(tmp_path / "x.safetensors")
    writer = SafetensorsShardWriter(path, [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()])
    for k, v in tensors.items():
        writer.write(k, v)  # "d" is a non-contiguous view
    assert writer.done
    assert check_safetensors_file(path) == list(tensors)  # header in write order, sizes consistent
    back = load_file(path)
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}

    writer = SafetensorsShardWriter(str(tmp_path / "y.safetensors"), [("a", (3, 5), torch.float32)])
    with pytest.raises(ValueError, match="planned 'a'"):
        writer.write("b", tensors["a"])
    with pytest.raises(ValueError, match="planned 'a'"):
        writer.write("a", tensors["a"].double())
    writer.close()


def test_shard_plan_follows_the_size_limit():
    from megatron_offgrpo.models.safetensors_io import plan_safetensors_shards

    f32 = torch.float32
    entries = [("a", (10,), f32), ("b", (10,), f32), ("c", (30,), f32), ("d", (5,), f32), ("e", (1,), f32)]
    names = [[n for n, _, _ in shard] for shard in plan_safetensors_shards(entries, max_shard_bytes=80)]
    assert names == [["a", "b"], ["c"], ["d", "e"]]  # 40+40; 120 alone (over the limit); 20+4


def test_reader_copies_rows_in_blocks(tmp_path):
    from megatron_offgrpo.models.safetensors_io import SafetensorsReader

    t = torch.randn(1000, 24).to(torch.bfloat16)
    save_file({"emb": t, "other": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    reader = SafetensorsReader(str(tmp_path), map_budget_bytes=16)
    out = torch.zeros(1024, 24)
    reader.copy_rows_into("emb", out[:1000], block_bytes=24 * 4 * 100)  # 10 blocks, fp32 rows
    assert torch.equal(out[:1000], t.float()) and not out[1000:].any()
    assert reader.shape("emb") == (1000, 24) and torch.equal(reader.get("other"), torch.ones(3))


def test_load_hf_config_applies_family_defaults_and_names_the_file(tmp_path):
    from megatron_offgrpo.models import CorruptCheckpointFileError, model_config_from_hf

    cfg = {"model_type": "qwen3", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 100}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    import transformers

    default = transformers.Qwen3Config()
    arch = model_config_from_hf(str(tmp_path))
    # Qwen3's head_dim is its own field (default 128), not hidden / heads (= 16 here).
    assert arch.head_dim == default.head_dim == 128
    assert arch.norm_eps == default.rms_norm_eps and arch.max_position_embeddings == default.max_position_embeddings
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": "four"}))
    with pytest.raises(CorruptCheckpointFileError, match="num_attention_heads") as e:
        model_config_from_hf(str(tmp_path))
    assert e.value.path == str(tmp_path / "config.json") and str(tmp_path / "config.json") in str(e.value)
