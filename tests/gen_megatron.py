"""Greedy decoding with the Megatron model itself: the oracle that an HF export of a checkpoint generates what the
trained Megatron model would (no KV cache, no HF code: the full sequence is run through ``GPTModel`` each step)."""

from __future__ import annotations

from typing import List


def megatron_greedy_worker(rank: int, world: int, ckpt: str, arch_dict: dict, prompts: List[List[int]],
                           max_new: int, stop_ids: List[int]) -> List[List[int]]:
    """For ``run_on_ranks(..., 1, ...)``: greedy continuations (stop token included) of token-id ``prompts``."""
    import torch

    from megatron.core import dist_checkpointing

    from megatron_offgrpo.models import ModelArchitecture, checkpoint_padded_vocab_size
    from megatron_offgrpo.models.checkpoint import checkpoint_dtype, ensure_single_process_parallel_state
    from megatron_offgrpo.models.converter import build_model_for_checkpoint
    from megatron_offgrpo.models.parity import megatron_logits

    ensure_single_process_parallel_state()
    arch = ModelArchitecture.from_dict(arch_dict)
    model = build_model_for_checkpoint(arch, checkpoint_padded_vocab_size(ckpt), checkpoint_dtype(ckpt))
    # A training checkpoint also holds the optimizer (its common state comes back at the top level): keep the
    # model's keys, and load those strictly (every parameter must be there).
    loaded = dist_checkpointing.load(model.sharded_state_dict(), ckpt)
    own = set(model.state_dict())
    model.load_state_dict({k: v for k, v in loaded.items() if k in own}, strict=True)
    model.eval()
    out = []
    for prompt in prompts:
        tokens = list(prompt)
        new: List[int] = []
        for _ in range(max_new):
            # Real vocabulary only: padded rows are stripped before the argmax, as the export strips them.
            logits = megatron_logits(model, torch.tensor([tokens]), arch.vocab_size)
            nxt = int(logits[0, -1].argmax())
            new.append(nxt)
            tokens.append(nxt)
            if nxt in stop_ids:
                break
        out.append(new)
    return out
