#!/usr/bin/env python
"""Peak RSS and time of HF <-> Megatron conversion vs model size, against the streaming target; 30B-A3B projection.

    python benchmarks/convert.py [--sizes 0.1b,0.5b-moe,1.1b] [--baseline-size 1.1b] [--workers 1] [--shard-mb 500]

For each size a random bf16 model is written locally (no download): ``config.json`` by ``transformers``, the
weights straight from random tensors into safetensors shards of ``--shard-mb`` under the Hub's tensor names (one
tensor per expert), with no model in memory. Each conversion (HF -> Megatron, then Megatron -> HF) runs in its
own subprocess, which records its RSS after importing everything the conversion uses (the interpreter baseline)
and its peak RSS: its high-water mark (VmHWM, reset after the imports; Linux), not ``ru_maxrss``, which a child
inherits from the parent that started it. Helper processes (``--workers``, Megatron's writers) report their
``ru_maxrss``.

Printed, all from this run:

* per size and direction: peak RSS (of the busiest process), the baseline, the target ``1.5 x largest shard +
  one layer`` (the issue's, net of the baseline: what the conversion itself may add), ``(peak - baseline) /
  target`` (must be <= 1) and ``peak / (target + baseline)``;
* for ``--baseline-size``: the previous in-memory converter (``streaming=False``) on the same model, and the
  ratio streaming / in-memory of the peak RSS and of the time;
* the projection for Qwen3-30B-A3B (examples/models/Qwen3-30B-A3B/config.json): the streaming peak is set by
  the largest tensor a conversion holds (embedding / output layer; a MoE layer is many small tensors), so the
  measured overhead per byte of that tensor, ``(peak - baseline) / largest tensor`` (the largest over the sizes
  run), times 30B-A3B's largest tensor, plus the memory of 30B-A3B's meta layout (measured: built here in a
  subprocess) and the baseline; next to its target (Hub shards of 4 GB, one layer).

Timings are disturbed by other load on the machine: compare the ratios, and re-run on a quiet machine.
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
from typing import Dict, Tuple

import torch
from safetensors.torch import save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024**3

_CHILD = r"""
import json, resource, sys, time
t = time.perf_counter()
# Everything a conversion imports, so that the baseline below is the interpreter, not the conversion.
import megatron.core.dist_checkpointing, torch.distributed.checkpoint, transformers  # noqa: F401
from megatron_offgrpo.models import streaming as streaming_module
from megatron_offgrpo.models.converter import convert_hf_to_mcore, convert_mcore_to_hf
t_import = time.perf_counter() - t
import psutil
baseline = psutil.Process().memory_info().rss
# The peak is this process's high-water mark (VmHWM), reset here: not ru_maxrss, which a child started by vfork +
# exec inherits from its parent (this benchmark's process, which wrote the model).
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
direction, a, b, c, shard_bytes, workers, streaming = sys.argv[1:8]
workers, streaming = int(workers), streaming == "1"
t = time.perf_counter()
if direction == "layout":  # what a conversion of the model `a` holds besides tensors: its meta layout
    import torch
    from megatron_offgrpo.models import model_config_from_hf
    from megatron_offgrpo.models.checkpoint import ensure_single_process_parallel_state
    ensure_single_process_parallel_state()
    arch = model_config_from_hf(a)
    layout = streaming_module.MegatronLayout(arch, arch.padded_vocab_size(1), torch.bfloat16)
    sharded = layout.sharded_state_dict()
elif direction == "hf_to_mcore":
    convert_hf_to_mcore(a, b, progress=False, workers=workers, streaming=streaming)
else:
    convert_mcore_to_hf(a, b, c, progress=False, max_shard_bytes=int(shard_bytes), workers=workers, streaming=streaming)
dt = time.perf_counter() - t
with open("/proc/self/status") as f:  # psutil has no field for VmHWM
    peak = 1024 * int(next(line for line in f if line.startswith("VmHWM:")).split()[1])
kids_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # helper processes (an upper bound, see above)
print("RESULT " + json.dumps({"seconds": dt, "import_seconds": t_import, "peak_rss": peak,
                             "peak_rss_children": kids_kb * 1024, "baseline_rss": baseline}))
"""

# name -> (transformers config class, config kwargs): ~0.1B dense, ~0.5B MoE (untied, as 30B-A3B), ~1.1B dense.
SIZES: Dict[str, Tuple[str, dict]] = {
    "0.1b": ("Qwen3Config", dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                                 num_key_value_heads=4, head_dim=64, tie_word_embeddings=True)),
    "0.5b-moe": ("Qwen3MoeConfig", dict(hidden_size=1024, intermediate_size=3072, moe_intermediate_size=256,
                                        num_experts=32, num_experts_per_tok=4, norm_topk_prob=True,
                                        num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                                        head_dim=64, tie_word_embeddings=False)),
    "1.1b": ("Qwen3Config", dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=16,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                 tie_word_embeddings=True)),
}  # fmt: skip
VOCAB = 151936
HUB_SHARD_BYTES = 4 * 10**9  # Qwen3-30B-A3B on the Hub: 16 safetensors shards of at most ~4 GB


def _write_random_model(d: str, size: str, shard_bytes: int) -> None:
    """config.json via transformers; random bf16 weights, shard by shard, in the Hub's tensor layout."""
    import transformers

    from megatron_offgrpo.models import model_config_from_hf
    from megatron_offgrpo.models.conversion import expected_hf_shapes

    cls, kw = SIZES[size]
    config = getattr(transformers, cls)(vocab_size=VOCAB, max_position_embeddings=40960, rms_norm_eps=1e-6,
                                        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                        dtype="bfloat16", **kw)  # fmt: skip
    config.save_pretrained(d)
    # The Hub's layout (one tensor per expert), which transformers' save_pretrained writes (tests/test_convert.py
    # pins expected_hf_shapes against it); transformers 5 fuses the experts in memory, so its state_dict differs.
    names = list(expected_hf_shapes(model_config_from_hf(d)).items())
    # Random bf16 values, fast: every tensor is a window, at a random offset, of a random pool repeated end to end
    # (drawing a billion normal values would take minutes; the conversions only move bytes).
    g = torch.Generator().manual_seed(0)
    pool = 1 << 22
    longest = max(torch.Size(s).numel() for _, s in names)
    tape = (0.02 * torch.randn(pool, generator=g)).to(torch.bfloat16).repeat(longest // pool + 2)
    shards, cur, cur_bytes = [], [], 0
    for name, shape in names:
        nbytes = 2 * torch.Size(shape).numel()
        if cur and cur_bytes + nbytes > shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape))
        cur_bytes += nbytes
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        offsets = torch.randint(0, pool, (len(shard),), generator=g).tolist()
        tensors = {n: tape[o : o + torch.Size(s).numel()].view(s).clone() for (n, s), o in zip(shard, offsets)}
        save_file(tensors, os.path.join(d, fname), metadata={"format": "pt"})
        del tensors
        weight_map.update({n: fname for n, _ in shard})
    total = sum(os.path.getsize(os.path.join(d, f)) for f in set(weight_map.values()))
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)


def _facts(arch, shard_sizes) -> dict:
    """Sizes that set the target and the projection (bf16 checkpoint)."""
    from megatron_offgrpo.models.conversion import expected_hf_shapes, expected_mcore_shapes

    hf = expected_hf_shapes(arch)
    nbytes = lambda shape: 2 * torch.Size(shape).numel()  # noqa: E731
    layer = sum(nbytes(s) for n, s in hf.items() if n.startswith("model.layers.0."))
    largest = max(nbytes(s) for s in expected_mcore_shapes(arch, arch.padded_vocab_size(1)).values())
    return {"params": sum(torch.Size(s).numel() for s in hf.values()), "disk": sum(shard_sizes),
            "largest_shard": max(shard_sizes), "shards": len(shard_sizes), "layer_bytes": layer,
            "largest_tensor": largest}  # fmt: skip


def _run_child(*args: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-4000:])
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def _process_peak(r: dict) -> int:
    """The largest peak RSS of one process of a conversion: its own, or a helper's (``workers > 1``)."""
    return max(r["peak_rss"], r["peak_rss_children"])


def _shard_sizes(d: str) -> list:
    return [os.path.getsize(os.path.join(d, f)) for f in sorted(os.listdir(d)) if f.endswith(".safetensors")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.1b,0.5b-moe,1.1b", help=f"comma-separated, from {sorted(SIZES)}")
    ap.add_argument("--baseline-size", default="1.1b", help="size also converted by the in-memory path ('' = none)")
    ap.add_argument("--workers", type=int, default=1, help="processes per streaming conversion")
    ap.add_argument("--shard-mb", type=int, default=500, help="safetensors shard size (input and export)")
    ap.add_argument("--workdir", default=None, help="default: a temporary directory, removed at the end")
    args = ap.parse_args()

    from megatron_offgrpo.models import model_config_from_hf

    sizes = [s for s in args.sizes.split(",") if s]
    root = args.workdir or tempfile.mkdtemp(prefix="convert_bench_")
    shard_bytes = args.shard_mb * 1024**2
    rows, facts_by_size = [], {}
    t_start = time.perf_counter()
    try:
        for size in sizes:
            d = os.path.join(root, size)
            hf = os.path.join(d, "hf")
            t = time.perf_counter()
            _write_random_model(hf, size, shard_bytes)
            arch = model_config_from_hf(hf)
            facts = facts_by_size[size] = _facts(arch, _shard_sizes(hf))
            print(f"[{size}] {arch.family}: {facts['params'] / 1e9:.3f} B params, {facts['shards']} shards, "
                  f"{facts['disk'] / GIB:.2f} GiB, largest shard {facts['largest_shard'] / GIB:.3f} GiB, one layer "
                  f"{facts['layer_bytes'] / GIB:.3f} GiB, largest tensor {facts['largest_tensor'] / GIB:.3f} GiB "
                  f"(written in {time.perf_counter() - t:.0f} s)", flush=True)  # fmt: skip
            methods = [("streaming", "1")] + ([("in-memory", "0")] if size == args.baseline_size else [])
            for method, flag in methods:
                mc, out = os.path.join(d, f"mcore_{method}"), os.path.join(d, f"export_{method}")
                workers = str(args.workers if flag == "1" else 1)
                r1 = _run_child("hf_to_mcore", hf, mc, "-", str(shard_bytes), workers, flag)
                r2 = _run_child("mcore_to_hf", mc, hf, out, str(shard_bytes), workers, flag)
                rows += [(size, method, "hf -> mcore", r1), (size, method, "mcore -> hf", r2)]
                shutil.rmtree(mc)
                shutil.rmtree(out)
                print(f"  {method}: hf->mcore {r1['seconds']:.0f} s, mcore->hf {r2['seconds']:.0f} s", flush=True)
            shutil.rmtree(d)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\npeak RSS vs model size (GiB; target = 1.5 x largest shard + one layer, net of the baseline; "
          f"workers={args.workers}: 'peak' is the largest of one process, the main one or a helper; "
          f"total {time.perf_counter() - t_start:.0f} s)")
    print(f"{'size':<9} {'method':<10} {'direction':<12} {'time s':>6} {'peak':>6} {'base':>5} {'peak-base':>9} "
          f"{'target':>6} {'(peak-base)/target':>18} {'peak/(target+base)':>18} {'helpers':>7}")  # fmt: skip
    for size, method, direction, r in rows:
        f = facts_by_size[size]
        target = 1.5 * f["largest_shard"] + f["layer_bytes"]
        net = _process_peak(r) - r["baseline_rss"]
        print(f"{size:<9} {method:<10} {direction:<12} {r['seconds']:6.1f} {_process_peak(r) / GIB:6.2f} "
              f"{r['baseline_rss'] / GIB:5.2f} {net / GIB:9.2f} {target / GIB:6.2f} {net / target:18.2f} "
              f"{_process_peak(r) / (target + r['baseline_rss']):18.2f} "
              f"{r['peak_rss_children'] / GIB:7.2f}")  # fmt: skip
    by = {(s, m, d): r for s, m, d, r in rows}
    if args.baseline_size in sizes:
        for direction in ("hf -> mcore", "mcore -> hf"):
            new = by[(args.baseline_size, "streaming", direction)]
            old = by[(args.baseline_size, "in-memory", direction)]
            print(f"{args.baseline_size} {direction}: streaming / in-memory peak RSS "
                  f"{_process_peak(new) / _process_peak(old):.2f} (net of baseline "
                  f"{(_process_peak(new) - new['baseline_rss']) / (_process_peak(old) - old['baseline_rss']):.2f}), "
                  f"time {new['seconds'] / old['seconds']:.2f}")  # fmt: skip

    # Projection for Qwen3-30B-A3B from the measured overhead per byte of the largest tensor.
    arch = model_config_from_hf(os.path.join(REPO, "examples", "models", "Qwen3-30B-A3B"))
    from megatron_offgrpo.models.conversion import expected_hf_shapes

    total = sum(2 * torch.Size(s).numel() for s in expected_hf_shapes(arch).values())
    big = _facts(arch, [min(HUB_SHARD_BYTES, total)])
    big["largest_shard"] = HUB_SHARD_BYTES
    target = 1.5 * big["largest_shard"] + big["layer_bytes"]
    # Its 18k tensors make a layout (meta model, sharded state dict) far larger than the small models': measured.
    lay = _run_child("layout", os.path.join(REPO, "examples", "models", "Qwen3-30B-A3B"), "-", "-", "0", "1", "1")
    layout_bytes = lay["peak_rss"] - lay["baseline_rss"]
    print(f"\nQwen3-30B-A3B: {big['params'] / 1e9:.1f} B params, {total / GIB:.1f} GiB bf16, one layer "
          f"{big['layer_bytes'] / GIB:.2f} GiB, largest tensor {big['largest_tensor'] / GIB:.2f} GiB, meta layout "
          f"{layout_bytes / GIB:.2f} GiB (built in {lay['seconds']:.0f} s); target 1.5 x {HUB_SHARD_BYTES / 1e9:.0f} "
          f"GB + one layer = {target / GIB:.2f} GiB")  # fmt: skip
    for direction in ("hf -> mcore", "mcore -> hf"):
        measured = [(_process_peak(r) - r["baseline_rss"], facts_by_size[s]["largest_tensor"], r["baseline_rss"])
                    for (s, m, d), r in by.items() if m == "streaming" and d == direction]  # fmt: skip
        per_byte = max(net / largest for net, largest, _ in measured)
        base = max(b for _, _, b in measured)
        projected = per_byte * big["largest_tensor"] + layout_bytes
        line = (f"  {direction}: streaming peak - baseline = {per_byte:.2f} x largest tensor (max over the sizes) + "
                f"layout -> {projected / GIB:.2f} GiB + {base / GIB:.2f} GiB baseline = {(projected + base) / GIB:.2f} "
                f"GiB; (peak-base)/target = {projected / target:.2f}")  # fmt: skip
        old = by.get((args.baseline_size, "in-memory", direction))
        if old is not None:  # the previous converter holds the model: its overhead per byte of model
            old_per_byte = (_process_peak(old) - old["baseline_rss"]) / facts_by_size[args.baseline_size]["disk"]
            line += f"; in-memory path: {old_per_byte:.2f} x model = {old_per_byte * total / GIB:.0f} GiB"
        print(line)


if __name__ == "__main__":
    main()
