"""The torch (SDPA) core attention: packed THD and context parallelism through the real ``GPTModel`` on CPU.

One spawned pair of gloo processes serves every layout (spawning costs more than the tiny model): a tiny Qwen3
(GQA, qk-norm, head_dim != hidden/heads) and a tiny Qwen2 (qkv bias, tied embeddings) with random HF weights,
converted in memory. For each, logits and parameter gradients of the same sequences are compared between

* the padded batch at CP=1 (the reference) and HF ``transformers`` run on each sequence alone (the oracle);
* the same sequences packed in THD, without and with alignment padding;
* CP=2, padded and packed, with sequence lengths that need padding to ``2*cp``.

The gradient probe is ``sum(logits * W)`` over real tokens with a fixed random ``W``: it touches every logit, so
any token attending to the wrong keys (another sequence, a pad, a chunk at the wrong position) changes it.
"""

from __future__ import annotations

import pytest
import torch

from megatron_offgrpo.utils.distributed import run_on_ranks

VOCAB = 96
LENGTHS = [7, 12, 5]  # 7 and 5 are odd: padded to a multiple of 2*cp = 4 under CP=2
TOL = 1e-5
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager")  # fmt: skip
FAMILIES = {
    "qwen3": ("Qwen3", dict(head_dim=32, tie_word_embeddings=False, rms_norm_eps=1e-6,
                            rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
    "qwen2": ("Qwen2", dict(tie_word_embeddings=True, rms_norm_eps=1e-6,
                            rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
}  # fmt: skip


def _hf_model(family: str):
    import transformers

    prefix, extra = FAMILIES[family]
    config = getattr(transformers, prefix + "Config")(**COMMON, **extra)
    model = getattr(transformers, prefix + "ForCausalLM")(config).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if (p.dim() == 1 and "norm" in name) else 0.0
            p.copy_(base + (0.2 if p.dim() == 1 else 0.1) * torch.randn(p.shape, generator=g))
    return model


def _sequences():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in LENGTHS]


def _probe_weights():
    g = torch.Generator().manual_seed(11)
    return [torch.randn(n, VOCAB, generator=g) for n in LENGTHS]


# ----------------------------------------------------------------------------------------------------------
# Worker (module level: run_on_ranks pickles it by reference)


def _build(arch, hf_state, cp: int):
    from megatron_offgrpo.models import build_gpt_model, build_transformer_config
    from megatron_offgrpo.models.conversion import hf_to_mcore_tensors

    config = build_transformer_config(arch, cp=cp, hidden_dropout=0.0, attention_dropout=0.0,
                                      use_cpu_initialization=True, perform_initialization=False)  # fmt: skip
    model = build_gpt_model(arch, config, backend="local", attention_backend="torch")
    padded = model.embedding.word_embeddings.weight.shape[0]
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in hf_to_mcore_tensors(arch, hf_state.__getitem__, padded):
            params[name].copy_(tensor)
    return model


def _run_layout(model, arch, seqs, probes, cp: int, packed: bool, align: int):
    """Per-sequence full logits (gathered over CP) and the CP-summed parameter gradients of the probe."""
    from megatron.core import parallel_state as ps
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_offgrpo.losses import split_for_context_parallel, split_packed_for_context_parallel

    cp_rank = ps.get_context_parallel_rank()
    model.zero_grad(set_to_none=True)
    lengths = [s.numel() for s in seqs]
    if packed:
        padded = [-(-n // align) * align for n in lengths]
        total = sum(padded)
        tokens = torch.zeros(1, total, dtype=torch.long)
        weight = torch.zeros(1, total, VOCAB)
        starts = torch.tensor([0] + padded).cumsum(0)
        for s, p, st in zip(seqs, probes, starts.tolist()):
            tokens[0, st:st + s.numel()] = s
            weight[0, st:st + s.numel()] = p
        cu_padded = starts.to(torch.int32)
        cu_real = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_real, cu_seqlens_kv=cu_real,
                                 cu_seqlens_q_padded=cu_padded, cu_seqlens_kv_padded=cu_padded,
                                 max_seqlen_q=max(padded), max_seqlen_kv=max(padded))  # fmt: skip
        index = torch.arange(total)
        local_index = split_packed_for_context_parallel(index[None], cu_padded, cp, cp_rank)[0]
        local_tokens = tokens[:, local_index]
        positions = split_packed_for_context_parallel(
            torch.cat([torch.arange(p) for p in padded])[None], cu_padded, cp, cp_rank)
        logits = model(local_tokens, positions, None, packed_seq_params=params)  # [1, t_local, V]
    else:
        t = -(-max(lengths) // align) * align
        tokens = torch.zeros(len(seqs), t, dtype=torch.long)
        weight = torch.zeros(len(seqs), t, VOCAB)
        for i, (s, p) in enumerate(zip(seqs, probes)):
            tokens[i, :s.numel()] = s
            weight[i, :s.numel()] = p
        index = torch.arange(t)
        local_index = split_for_context_parallel(index[None], cp, cp_rank)[0]
        logits = model(tokens[:, local_index], local_index[None].expand(len(seqs), -1), None)
    logits = logits[..., :VOCAB]
    (logits * weight[:, local_index]).sum().backward()

    # Reassemble the full logits from the CP ranks (reference-only bookkeeping, outside autograd).
    full = torch.zeros(tokens.shape[0], tokens.shape[1], VOCAB)
    full[:, local_index] = logits.detach()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    if cp > 1:
        group = ps.get_context_parallel_group()
        torch.distributed.all_reduce(full, group=group)  # each position is owned by exactly one rank
        for g in grads.values():
            torch.distributed.all_reduce(g, group=group)
    if packed:
        out = [full[0, st:st + n] for st, n in zip(starts.tolist(), lengths)]
    else:
        out = [full[i, :n] for i, n in enumerate(lengths)]
    return out, grads


def _worker(rank: int, world: int, hf_configs: dict, hf_states: dict, seqs, probes) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_offgrpo.models import model_config_from_hf
    from megatron_offgrpo.utils.cpu_backend import initialize_cpu_model_parallel

    res: dict = {}
    for cp in (1, 2):
        initialize_cpu_model_parallel(context_parallel_size=cp)
        for fam, cfg in hf_configs.items():
            arch = model_config_from_hf(cfg)
            model = _build(arch, hf_states[fam], cp)
            layouts = {"pad": (False, 1), "pack": (True, 1), "pack_aligned": (True, 8)} if cp == 1 else \
                {"pad": (False, 4), "pack": (True, 4), "pack_aligned": (True, 8)}
            for name, (packed, align) in layouts.items():
                res[(fam, cp, name)] = _run_layout(model, arch, seqs, probes, cp, packed, align)
        ps.destroy_model_parallel()
    return res


@pytest.fixture(scope="module")
def results():
    hf = {fam: _hf_model(fam) for fam in FAMILIES}
    seqs, probes = _sequences(), _probe_weights()
    oracle = {fam: [m(input_ids=s[None]).logits[0].detach() for s in seqs] for fam, m in hf.items()}
    out = run_on_ranks(_worker, 2, {f: m.config.to_dict() for f, m in hf.items()},
                       {f: {k: v.detach().clone() for k, v in m.state_dict().items()} for f, m in hf.items()},
                       seqs, probes)  # fmt: skip
    # Both ranks hold the same full results (CP-reduced; at CP=1 they are data-parallel replicas).
    return out[0], out[1], oracle


def _close(ref: torch.Tensor, other: torch.Tensor, tol: float = TOL, what: str = "") -> None:
    err = (ref - other).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= tol * max(scale, 1e-6), f"{what}: max abs diff {err:.3e} vs scale {scale:.3e}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_padded_matches_hf_oracle(results, family):
    res, _, oracle = results
    logits, _ = res[(family, 1, "pad")]
    for i, (ours, hf) in enumerate(zip(logits, oracle[family])):
        # HF uses its own attention and RoPE kernels: agreement to fp32 round-off, looser than layout invariance.
        _close(hf, ours, tol=1e-4, what=f"{family} seq {i} vs HF")


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("cp,layout", [(1, "pack"), (1, "pack_aligned"), (2, "pad"), (2, "pack"), (2, "pack_aligned")])
def test_layout_invariance(results, family, cp, layout):
    res, res1, _ = results
    ref_logits, ref_grads = res[(family, 1, "pad")]
    logits, grads = res[(family, cp, layout)]
    for i, (a, b) in enumerate(zip(ref_logits, logits)):
        _close(a, b, what=f"{family} cp={cp} {layout} seq {i} logits")
    assert ref_grads.keys() == grads.keys()
    for name in ref_grads:
        _close(ref_grads[name], grads[name], what=f"{family} cp={cp} {layout} grad {name}")
    # The other rank agrees (CP ranks reassemble the same full result).
    for a, b in zip(logits, res1[(family, cp, layout)][0]):
        _close(a, b, what="rank 1")
