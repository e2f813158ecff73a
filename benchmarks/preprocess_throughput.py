#!/usr/bin/env python
"""Preprocessing and reader throughput, as ratios against baselines measured in the same run.

1. label + tokenize + write (``build_dataset``) on synthetic OpenThoughts3-format rollouts with 1 and 2 process
   workers: trajectories/s, and the 2-worker speed-up over 1 worker.
2. random access: ``TrajectoryDataset[i]`` (Megatron-Core mmap IndexedDataset + NumPy metadata) vs reading the same
   rows (tokens + per-sequence metadata) from a Parquet file through HF ``datasets`` (Arrow, memory-mapped) and
   through ``pyarrow`` (``Table.slice``): reads/s and the ratio over each baseline.

    python benchmarks/preprocess_throughput.py [--num-problems 120] [--reads 3000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
warnings.filterwarnings("ignore", category=DeprecationWarning)

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from megatron_offgrpo.preprocess.build import BuildConfig, build_dataset  # noqa: E402
from megatron_offgrpo.preprocess.synthetic import generate_rows, write_jsonl  # noqa: E402
from megatron_offgrpo.preprocess.tiny_tokenizer import TINY_TOKENIZER_DIR  # noqa: E402


def bench_build(inp: str, out_dir: str, workers: int) -> tuple:
    t0 = time.perf_counter()
    res = build_dataset(BuildConfig([inp], TINY_TOKENIZER_DIR, os.path.join(out_dir, f"w{workers}"),
                                    max_seq_len=4096, domain="math", workers=workers, progress=False))
    dt = time.perf_counter() - t0
    return res.trajectories_in, dt, os.path.join(out_dir, f"w{workers}")


def bench_reads(fn, idx: np.ndarray) -> float:
    fn(int(idx[0]))  # warm-up (page cache, lazy init)
    t0 = time.perf_counter()
    for i in idx:
        fn(int(i))
    return len(idx) / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-problems", type=int, default=120)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--reads", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    console = Console()

    with tempfile.TemporaryDirectory() as tmp:
        inp = os.path.join(tmp, "rows.jsonl")
        write_jsonl(list(generate_rows(a.num_problems, a.k, a.seed)), inp)

        t = Table(title=f"label + tokenize + write ({a.num_problems} problems x {a.k} rollouts)")
        for c in ("workers", "trajectories", "seconds", "trajectories/s", "vs 1 worker"):
            t.add_column(c, justify="right")
        base = None
        prefix = None
        for w in (1, 2):
            n, dt, prefix_w = bench_build(inp, tmp, w)
            rate = n / dt
            base = base or rate
            prefix = prefix or prefix_w
            t.add_row(str(w), str(n), f"{dt:.2f}", f"{rate:.1f}", f"{rate / base:.2f}x")
        console.print(t)

        from megatron_offgrpo.data.dataset import TrajectoryDataset

        ds = TrajectoryDataset(prefix)
        n = len(ds)
        rows = [ds[i] for i in range(n)]
        table = pa.table({
            "tokens": pa.array([r["tokens"].numpy().astype(np.int32) for r in rows], type=pa.list_(pa.int32())),
            "prompt_len": [r["prompt_len"] for r in rows], "reward": [r["reward"] for r in rows],
            "group_id": [r["group_id"] for r in rows], "rollout_index": [r["rollout_index"] for r in rows],
        })
        pq_path = os.path.join(tmp, "same.parquet")
        pq.write_table(table, pq_path)
        import datasets

        hf = datasets.Dataset.from_parquet(pq_path, cache_dir=os.path.join(tmp, "hf_cache"))
        hf_np = hf.with_format("numpy")
        pa_table = pq.read_table(pq_path, memory_map=True)
        idx = np.random.default_rng(a.seed).integers(0, n, size=a.reads)

        # Sanity: the three readers return the same tokens.
        for i in idx[:20]:
            assert np.array_equal(ds[int(i)]["tokens"].numpy(), hf_np[int(i)]["tokens"].astype(np.int64))
            assert np.array_equal(ds[int(i)]["tokens"].numpy(), np.asarray(pa_table.slice(int(i), 1).column("tokens")[0].as_py()))

        r_ds = bench_reads(lambda i: ds[i], idx)
        r_hf = bench_reads(lambda i: hf_np[i], idx)
        r_pa = bench_reads(lambda i: pa_table.slice(i, 1).to_pylist(), idx)
        t = Table(title=f"random access: {a.reads} reads over {n} sequences (tokens + metadata)")
        for c in ("reader", "reads/s", "TrajectoryDataset speed-up"):
            t.add_column(c, justify="right")
        t.add_row("TrajectoryDataset (IndexedDataset mmap)", f"{r_ds:.0f}", "1.00x")
        t.add_row("Parquet via HF datasets (numpy format)", f"{r_hf:.0f}", f"{r_ds / r_hf:.2f}x")
        t.add_row("Parquet via pyarrow Table.slice", f"{r_pa:.0f}", f"{r_ds / r_pa:.2f}x")
        console.print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
