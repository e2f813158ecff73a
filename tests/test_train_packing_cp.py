"""One offline GRPO step with packed sequences and with context parallelism equals the padded CP=1 step.

The layouts share the initial checkpoint and the data of tests/test_train.py (its helpers are reused); the torch
(SDPA) core attention is what lets packing and CP=2 run through the real model on CPU. Loss, metrics and every
updated weight (read back at TP=1) must agree with the padded CP=1 step to fp32 round-off.
"""

from __future__ import annotations

from test_train import dataset, init_checkpoint, run_layouts_and_compare  # noqa: F401  (fixtures used by name)


def test_one_step_is_the_same_packed_and_under_context_parallelism(dataset, init_checkpoint, tmp_path):
    layouts = {
        "pad": (1, {}),
        "packed": (1, {"data.packing": True}),
        "cp2": (2, {"parallel.cp": 2}),
        "cp2_packed": (2, {"parallel.cp": 2, "data.packing": True, "data.micro_batch_size": 4}),
    }
    run_layouts_and_compare(dataset, init_checkpoint, str(tmp_path), layouts, "pad",
                            **{"model.attention_backend": "torch"})
