"""Score every sequence of a dataset with a model: per-token log-probs for ``ref_logp`` / ``teacher_logp``.

Offline data means the reference (or OPD teacher) log-probs can be computed once and stored next to the tokens
(DESIGN 3, 5). Scoring uses the training engine itself (same model provider, same parallel layout, same
vocab-parallel log-prob kernel), because another engine's log-probs differ in precision. The array is aligned
with the tokens: entry ``j`` is ``log p(token_j | tokens_<j)``, and entry 0 (no context) is 0.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List

import numpy as np
import torch
import torch.distributed as dist

from megatron_offgrpo.config.schema import TrainConfig
from megatron_offgrpo.utils.distributed import all_reduce_cpu


def score_dataset(cfg: TrainConfig, prefix: str) -> Dict[int, np.ndarray]:
    """Log-probs of every sequence of ``prefix`` under the model ``cfg.model`` describes (call on every rank).

    Sequences are split over DP ranks; the result is gathered on rank 0 (other ranks return ``{}``).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from tqdm import tqdm

    from megatron_offgrpo.data import TrajectoryDataset, collate_pad
    from megatron_offgrpo.losses import cp_chunk_indices, logprobs_from_model_output, split_for_context_parallel
    from megatron_offgrpo.losses.fused_output import fused_output_layer_enabled
    from megatron_offgrpo.models.provider import output_hidden_states
    from megatron_offgrpo.training.setup import build_training_objects, initialize_distributed

    initialize_distributed(cfg)
    objs = build_training_objects(cfg)
    fused = fused_output_layer_enabled(cfg.loss.fused_output_layer)
    for chunk in objs.model:
        chunk.eval()
    dataset = TrajectoryDataset(prefix, per_token_arrays=())
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    cp_size, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    mbs, d = cfg.data.micro_batch_size, cfg.data
    mine = list(range(dp_rank, len(dataset), dp_size))
    results: Dict[int, np.ndarray] = {}
    last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
    batches = [mine[i : i + mbs] for i in range(0, len(mine), mbs)]
    # Every DP rank must run the same number of pipeline schedules: pad the short ones with a repeat.
    n_batches = all_reduce_cpu(torch.tensor([len(batches)]), op=dist.ReduceOp.MAX)
    real_batches = len(batches)
    batches += [batches[-1]] * (int(n_batches) - len(batches))
    bar = tqdm(batches, desc=f"scoring {prefix}", disable=dist.get_rank() != 0)
    for b, rows in enumerate(bar):
        samples = [dataset[i] for i in rows]
        fixed = d.seq_length if cfg.parallel.pp > 1 else None
        batch = collate_pad(samples, pad_token_id=d.pad_token_id, max_len=fixed,
                            pad_to_multiple_of=1 if fixed else 2 * cp_size)
        tokens, labels = batch["tokens"], batch["labels"]
        full_len = tokens.shape[1]
        split = lambda t: split_for_context_parallel(t, cp_size, cp_rank)  # noqa: E731
        local = {"tokens": split(tokens), "positions": split(batch["position_ids"]), "labels": split(labels)}

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            device = next(model.parameters()).device
            # loss.fused_output_layer: the model returns hidden states and the log-probs apply the output weight
            # (the same function as the trainer's, so scored and trained log-probs agree), logits never exist.
            with output_hidden_states(model) if fused else contextlib.nullcontext() as output_weight:
                out = model(mb["tokens"].to(device), mb["positions"].to(device), None)

            def collect(output):
                logp = logprobs_from_model_output(output, mb["labels"].to(output.device), output_weight,
                                                  vocab_size=objs.vocab_size,
                                                  sequence_parallel=cfg.parallel.sequence_parallel)
                return output.sum() * 0.0, {"logp": logp.detach().cpu()}

            return out, collect

        with torch.no_grad():
            outputs = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([local]), model=objs.model,
                num_microbatches=1, seq_length=full_len, micro_batch_size=len(rows), forward_only=True,
            )
        if not last_stage or ps.get_tensor_model_parallel_rank() != 0 or b >= real_batches:
            continue  # only one rank per (DP, CP) coordinate keeps results; repeats only keep ranks in step
        logp = outputs[0]["logp"]
        if cp_size > 1:  # put this rank's chunks back at their global positions; other CP ranks fill the rest
            full = torch.zeros(len(rows), full_len)
            full[:, cp_chunk_indices(full_len, cp_size, cp_rank)] = logp
            logp = full
        for j, i in enumerate(rows):
            n = int(batch["seq_lens"][j])
            arr = np.zeros(n, dtype=np.float32)
            arr[1:] = logp[j, : n - 1].numpy()  # the label at t is token t+1
            results[i] = arr
    return _gather_on_rank0(results)


def _gather_on_rank0(results: Dict[int, np.ndarray]) -> Dict[int, np.ndarray]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return results
    gathered: List[Dict[int, np.ndarray]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, results)
    if dist.get_rank() != 0:
        return {}
    merged: Dict[int, np.ndarray] = {}
    for part in gathered:
        for i, arr in part.items():
            # DP ranks score disjoint sequences; CP ranks hold disjoint positions of the same one (zeros elsewhere).
            merged[i] = arr if i not in merged else merged[i] + arr
    return merged
