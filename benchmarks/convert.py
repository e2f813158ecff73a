#!/usr/bin/env python
"""Time and peak RSS of HF -> Megatron conversion of a ~1B-parameter random Qwen3, vs its size on disk.

    python benchmarks/convert.py [--layers 16 --hidden 2048 --ffn 6144 --shard-mb 500 --workdir /tmp/x]

The model is written locally as bf16 safetensors shards straight from random tensors (no download, no HF
model object in memory). Each conversion direction runs in its own subprocess, which reports its own peak
RSS (ru_maxrss) and that of its helper processes (dist_checkpointing writers). Printed ratios, all from this
run: peak RSS / largest shard, peak RSS / (1.5 x largest shard + one layer) (the issue's target is <= 1), and
peak RSS / total size on disk, and the target ratio net of the import baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

_CHILD = r"""
import json, resource, sys, time
t = time.perf_counter()
from megatron_offgrpo.models.converter import convert_hf_to_mcore, convert_mcore_to_hf
t_import = time.perf_counter() - t
import psutil
baseline = psutil.Process().memory_info().rss  # interpreter + torch + megatron + transformers, before any work
direction, a, b, c = sys.argv[1:5]
t = time.perf_counter()
if direction == "hf_to_mcore":
    convert_hf_to_mcore(a, b, progress=False)
else:
    convert_mcore_to_hf(a, b, c, progress=False, max_shard_bytes=int(sys.argv[5]))
dt = time.perf_counter() - t
self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kids_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print("RESULT " + json.dumps({"seconds": dt, "import_seconds": t_import, "peak_rss": self_kb * 1024,
                             "peak_rss_children": kids_kb * 1024, "baseline_rss": baseline}))
"""


def _write_random_qwen3(d: str, layers: int, hidden: int, ffn: int, heads: int, kv: int, head_dim: int,
                        vocab: int, shard_bytes: int) -> dict:  # fmt: skip
    """Write a random bf16 Qwen3 (tied embeddings, like Qwen3-0.6B..4B) shard by shard; returns size facts."""
    os.makedirs(d, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: (0.02 * torch.randn(*shape, generator=g)).to(torch.bfloat16)  # noqa: E731
    names = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        names += [
            (p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
            (p + "self_attn.k_proj.weight", (kv * head_dim, hidden)),
            (p + "self_attn.v_proj.weight", (kv * head_dim, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
            (p + "self_attn.q_norm.weight", (head_dim,)), (p + "self_attn.k_norm.weight", (head_dim,)),
            (p + "mlp.gate_proj.weight", (ffn, hidden)), (p + "mlp.up_proj.weight", (ffn, hidden)),
            (p + "mlp.down_proj.weight", (hidden, ffn)),
        ]  # fmt: skip
    names.append(("model.norm.weight", (hidden,)))

    shards, cur, cur_bytes = [], {}, 0
    for name, shape in names:
        nbytes = 2 * int(torch.tensor(shape).prod())
        if cur and cur_bytes + nbytes > shard_bytes:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[name] = shape
        cur_bytes += nbytes
    shards.append(cur)
    weight_map, sizes, params = {}, [], 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: rnd(*s) for n, s in shard.items()}
        params += sum(t.numel() for t in tensors.values())
        save_file(tensors, os.path.join(d, fname), metadata={"format": "pt"})
        del tensors
        sizes.append(os.path.getsize(os.path.join(d, fname)))
        weight_map.update({n: fname for n in shard})
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f)
    config = dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=hidden, intermediate_size=ffn,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
        vocab_size=vocab, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True, hidden_act="silu", torch_dtype="bfloat16", attention_bias=False,
    )  # fmt: skip
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    layer_bytes = 2 * (hidden * (heads + 2 * kv) * head_dim + heads * head_dim * hidden + 3 * hidden * ffn)
    return {"params": params, "disk": sum(sizes), "largest_shard": max(sizes), "shards": len(sizes),
            "layer_bytes": layer_bytes}  # fmt: skip


def _run_child(*args: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    p = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-4000:])
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _dir_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=6144)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--shard-mb", type=int, default=500)
    ap.add_argument("--workdir", default=None, help="default: a temporary directory, removed at the end")
    ap.add_argument("--skip-export", action="store_true", help="only time HF -> Megatron")
    args = ap.parse_args()

    root = args.workdir or tempfile.mkdtemp(prefix="convert_bench_")
    gib = 1024**3
    try:
        hf = os.path.join(root, "hf")
        t = time.perf_counter()
        facts = _write_random_qwen3(hf, args.layers, args.hidden, args.ffn, args.heads, args.kv_heads, args.head_dim,
                                    args.vocab, args.shard_mb * 1024**2)  # fmt: skip
        print(f"random Qwen3: {facts['params'] / 1e9:.3f} B params, {facts['shards']} shards, "
              f"{facts['disk'] / gib:.2f} GiB on disk, largest shard {facts['largest_shard'] / gib:.3f} GiB, "
              f"one layer {facts['layer_bytes'] / gib:.3f} GiB (written in {time.perf_counter() - t:.1f} s)")
        target = 1.5 * facts["largest_shard"] + facts["layer_bytes"]

        res = _run_child("hf_to_mcore", hf, os.path.join(root, "mcore"), "-")
        ck_bytes = _dir_bytes(os.path.join(root, "mcore"))
        rows = [("hf -> mcore", res)]
        if not args.skip_export:
            res2 = _run_child("mcore_to_hf", os.path.join(root, "mcore"), hf, os.path.join(root, "export"),
                              str(args.shard_mb * 1024**2))  # fmt: skip
            rows.append(("mcore -> hf", res2))
        print(f"megatron checkpoint: {ck_bytes / gib:.2f} GiB on disk")
        print(f"{'direction':<12} {'time s':>7} {'GB/s':>6} {'peak RSS GiB':>12} {'helpers GiB':>11} "
              f"{'RSS/shard':>9} {'RSS/target':>10} {'RSS/disk':>8} {'(RSS-base)/target':>17}")
        for name, r in rows:
            print(f"{name:<12} {r['seconds']:7.1f} {facts['disk'] / r['seconds'] / 1e9:6.2f} "
                  f"{r['peak_rss'] / gib:12.2f} {r['peak_rss_children'] / gib:11.2f} "
                  f"{r['peak_rss'] / facts['largest_shard']:9.2f} {r['peak_rss'] / target:10.2f} "
                  f"{r['peak_rss'] / facts['disk']:8.2f} {(r['peak_rss'] - r['baseline_rss']) / target:17.2f}")
        print(f"target (issue): peak RSS <= 1.5 x largest shard + one layer = {target / gib:.2f} GiB "
              f"(RSS/target <= 1); "
              f"import baseline RSS {rows[0][1]['baseline_rss'] / gib:.2f} GiB is included in 'peak RSS'")
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
