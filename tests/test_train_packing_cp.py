"""One offline GRPO step with packed sequences and with context parallelism equals the padded CP=1 step.

The layouts share the initial checkpoint and the data of tests/test_train.py (its helpers are reused); the torch
(SDPA) core attention is what lets packing and CP=2 run through the real model on CPU. Loss, metrics and every
updated weight (read back at TP=1) must agree with the padded CP=1 step to fp32 round-off.
"""

from __future__ import annotations

import torch

from megatron_offgrpo.utils.distributed import run_on_ranks
from test_train import (  # noqa: F401  (fixtures are used by name)
    _overrides,
    _read_weights_worker,
    _train_worker,
    dataset,
    init_checkpoint,
)


def test_one_step_is_the_same_packed_and_under_context_parallelism(dataset, init_checkpoint, tmp_path):
    tmp = str(tmp_path)
    layouts = {
        "pad": (1, {}),
        "packed": (1, {"data.packing": True}),
        "cp2": (2, {"parallel.cp": 2}),
        "cp2_packed": (2, {"parallel.cp": 2, "data.packing": True, "data.micro_batch_size": 4}),
    }
    results = {}
    for name, (world, extra) in layouts.items():
        overrides = _overrides(dataset, tmp, name, **{"model.load": init_checkpoint, "optimizer.adam_eps": 1e-3,
                                                      "model.attention_backend": "torch", **extra})
        results[name] = run_on_ranks(_train_worker, world, overrides)[0]
    weights = run_on_ranks(_read_weights_worker, 1, [r["checkpoint"] for r in results.values()], init_checkpoint)[0]

    base = results["pad"]["history"][0]
    base_w = weights[results["pad"]["checkpoint"]]
    assert base["loss"] != 0 and base["kl"] > 0
    for name, r in results.items():
        h = r["history"][0]
        for key in ("loss", "kl", "clip_frac", "logprob_pos", "logprob_neg", "grad_norm"):
            assert abs(h[key] - base[key]) <= 1e-5 * max(1.0, abs(base[key])), (name, key, h[key], base[key])
        w = weights[r["checkpoint"]]
        assert w.keys() == base_w.keys()
        for k in base_w:
            diff = (w[k] - base_w[k]).abs()
            assert torch.allclose(w[k], base_w[k], rtol=1e-5, atol=1e-6), (name, k, diff.max().item())
