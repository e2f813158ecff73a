"""The project's torch (SDPA) core attention vs Transformer Engine's, on Qwen2.5-7B layer shapes (GPU).

    python benchmarks/attention_backends.py --seqs 4096,16384

Three models with the same TE linear layers, differing only in the core attention (and one with the local spec):

    te            TE spec, TE core attention (the baseline)
    te+torch      TE spec, our TorchDotProductAttention (what ``model.attention_backend=torch`` gives on GPU)
    local+torch   Megatron local spec + our torch attention (the CPU path, for reference)

For each sequence length: forward+backward of 4 layers + output layer + Megatron's vocab-parallel cross entropy,
micro-batch 1, bf16; tokens/s and peak memory as ratios against ``te`` from the same run. Then packed-THD parity:
``te`` and ``te+torch`` with identical weights on the same packed batch (several sequences, alignment padding),
and each against its own padded per-sequence run: max |logit difference| (bf16 noise is ~1e-2 at these scales).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics

import torch


def _setup() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl")
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(0)


def _arch(layers: int, seq: int):
    from megatron_offgrpo.models import tiny_architecture

    return dataclasses.replace(
        tiny_architecture(), family="qwen2", num_layers=layers, hidden_size=3584, ffn_hidden_size=18944,
        num_attention_heads=28, num_query_groups=4, head_dim=128, vocab_size=152064, qkv_bias=True, qk_norm=False,
        max_position_embeddings=seq, rope_theta=1e6)


def _model(arch, backend: str, attention: str):
    from megatron_offgrpo.models import build_gpt_model, build_transformer_config

    config = build_transformer_config(arch, params_dtype=torch.bfloat16, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    return build_gpt_model(arch, config, backend=backend, attention_backend=attention).cuda()


VARIANTS = {"te": ("te", "default"), "te+torch": ("te", "torch"), "local+torch": ("local", "torch")}


def _time_and_memory(model, seq: int, reps: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(0, 152064, (1, seq), device="cuda", generator=g)
    labels = torch.roll(tokens, -1, 1)
    pos = torch.arange(seq, device="cuda")[None]

    def step():
        model(tokens, pos, None, labels=labels).float().mean().backward()
        model.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**30


def _packed_logits(model, tokens_list, align: int):
    from megatron.core.packed_seq_params import PackedSeqParams

    lens = [len(t) for t in tokens_list]
    padded = [-(-n // align) * align for n in lens]
    flat = torch.zeros(sum(padded), dtype=torch.long, device="cuda")
    pos = torch.zeros_like(flat)
    offsets = [0]
    for t, n, p in zip(tokens_list, lens, padded):
        flat[offsets[-1] : offsets[-1] + n] = t
        pos[offsets[-1] : offsets[-1] + p] = torch.arange(p, device="cuda")
        offsets.append(offsets[-1] + p)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")
    cu_padded = torch.tensor(offsets, dtype=torch.int32, device="cuda")
    # TE's THD convention: cu_seqlens are the real lengths' prefix sums, cu_seqlens_*_padded the aligned ones.
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_padded,
                             cu_seqlens_kv_padded=cu_padded, max_seqlen_q=max(padded), max_seqlen_kv=max(padded))
    with torch.no_grad():
        out = model(flat[None], pos[None], None, packed_seq_params=params)[0]
    return [out[o : o + n].float() for o, n in zip(offsets[:-1], lens)]


def _padded_logits(model, tokens_list):
    outs = []
    with torch.no_grad():
        for t in tokens_list:
            outs.append(model(t[None], torch.arange(len(t), device="cuda")[None], None)[0].float())
    return outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", default="4096,16384")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    _setup()
    print(f"{torch.cuda.get_device_name()}: Qwen2.5-7B layer shapes, {args.layers} layers, bf16, micro-batch 1")
    print(f"{'seq':>6} {'variant':>12} {'time ms':>9} {'tokens/s':>10} {'peak GiB':>9} {'speed vs te':>12} {'mem vs te':>10}")
    for seq in (int(s) for s in args.seqs.split(",")):
        arch = _arch(args.layers, seq)
        rows = {}
        for name, (backend, attention) in VARIANTS.items():
            model = _model(arch, backend, attention)
            rows[name] = _time_and_memory(model, seq, args.reps)
            del model
            torch.cuda.empty_cache()
        t0, m0 = rows["te"]
        for name, (t, m) in rows.items():
            print(f"{seq:>6} {name:>12} {t * 1e3:>9.1f} {seq / t:>10.0f} {m:>9.2f} {t0 / t:>11.2f}x {m / m0:>9.2f}x")

    # Packed THD parity, identical weights (the core attention has no parameters).
    arch = _arch(args.layers, 4096)
    te = _model(arch, "te", "default")
    ours = _model(arch, "te", "torch")
    missing, unexpected = ours.load_state_dict(te.state_dict(), strict=False)
    assert not [k for k in missing + unexpected if not k.endswith("_extra_state")], (missing, unexpected)
    g = torch.Generator(device="cuda").manual_seed(1)
    seqs = [torch.randint(0, 152064, (n,), device="cuda", generator=g) for n in (1000, 2047, 13, 517)]
    packed_te, packed_ours = _packed_logits(te, seqs, 16), _packed_logits(ours, seqs, 16)
    padded_te, padded_ours = _padded_logits(te, seqs), _padded_logits(ours, seqs)
    scale = max(p.abs().max().item() for p in padded_te)

    def worst(a, b):
        return max((x - y).abs().max().item() for x, y in zip(a, b))

    print(f"packed THD parity (lengths {[len(s) for s in seqs]}, aligned to 16; |logits| up to {scale:.1f}):")
    print(f"  te packed vs te padded:        max |diff| {worst(packed_te, padded_te):.4f}")
    print(f"  torch packed vs torch padded:  max |diff| {worst(packed_ours, padded_ours):.4f}")
    print(f"  torch packed vs te packed:     max |diff| {worst(packed_ours, packed_te):.4f}")
    agree = sum((x.argmax(-1) == y.argmax(-1)).float().mean().item() for x, y in zip(packed_ours, packed_te)) / len(seqs)
    print(f"  torch vs te top-1 agreement:   {agree:.4f}")


if __name__ == "__main__":
    main()
