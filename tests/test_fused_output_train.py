"""The trainer with ``loss.fused_output_layer`` on takes the same step as with it off, in every layout.

The layouts share the initial checkpoint and the data of tests/test_train.py (its helpers are reused): the unfused
TP=1 step is the baseline; the fused step (its gradients taken in forward, the default; and recomputed in backward) at TP=1, TP=2, PP=2,
CP=2 and packed must give the same loss, metrics and
updated weights (read back at TP=1) to fp32 round-off. The torch (SDPA) core attention lets CP and packing run on
CPU; it is used by every layout so that only the output layer differs from the baseline.
"""

from __future__ import annotations

from test_train import dataset, init_checkpoint, run_layouts_and_compare  # noqa: F401  (fixtures used by name)

FUSED = {"loss.fused_output_layer": "true"}


def test_fused_output_layer_step_equals_the_unfused_step_in_every_layout(dataset, init_checkpoint, tmp_path):
    layouts = {
        "unfused": (1, {"loss.fused_output_layer": "false"}),
        "fused": (1, FUSED),  # gradients taken in the forward pass (loss.fused_output_gradients: forward)
        "fused_recompute": (1, {**FUSED, "loss.fused_output_gradients": "recompute"}),
        "fused_tp2": (2, {**FUSED, "parallel.tp": 2}),  # vocabulary padded to 512 rows: rank 1 holds 5 real ones
        "fused_pp2": (2, {**FUSED, "parallel.pp": 2, "data.micro_batch_size": 4}),
        "fused_cp2": (2, {**FUSED, "parallel.cp": 2}),
        "fused_packed": (1, {**FUSED, "data.packing": True}),
    }
    run_layouts_and_compare(dataset, init_checkpoint, str(tmp_path), layouts, "unfused",
                            **{"model.attention_backend": "torch"})
