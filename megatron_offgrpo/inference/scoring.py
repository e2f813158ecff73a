"""Score every sequence of a dataset with a model: per-token log-probs for ``ref_logp`` / ``teacher_logp``.

Offline data means the reference (or OPD teacher) log-probs can be computed once and stored next to the tokens
(docs/design.md, "Data format" and "Lightning OPD"). Scoring uses the training engine itself: the same model
provider and parallel layout, the step's own batch code (:func:`~megatron_offgrpo.training.step.build_step_batch`:
collation, padding, packing, the CP split) and forward step, and the same log-prob function as the loss, because
another engine's (or another padding's) log-probs differ in precision. The array is aligned with the tokens: entry
``j`` is ``log p(token_j | tokens_<j)``, and entry 0 (no context) is 0.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch
import torch.distributed as dist

from megatron_offgrpo.config.schema import TrainConfig
from megatron_offgrpo.utils.distributed import all_reduce_cpu


def _sequence_positions(mb, row: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions, in sequence ``row`` of the microbatch (padded), of the log-probs this CP rank holds for it, in
    the order it holds them."""
    from megatron_offgrpo.losses import cp_chunk_indices

    if mb.packed_seq is None:  # one padded length for the microbatch, split into 2*cp chunks as a whole
        length = mb.tokens.shape[1] * cp_size
    else:  # each packed sequence is padded to a multiple of 2*cp and split on its own
        bounds = mb.packed_seq["cu_seqlens_padded"]
        length = int(bounds[row + 1] - bounds[row])
    return cp_chunk_indices(length, cp_size, cp_rank) if cp_size > 1 else torch.arange(length)


def score_dataset(cfg: TrainConfig, prefix: str) -> Dict[int, np.ndarray]:
    """Log-probs of every sequence of ``prefix`` under the model ``cfg.model`` describes (call on every rank).

    Sequences are split over DP ranks, ``data.micro_batch_size`` per microbatch and ``pp`` microbatches per
    pipeline schedule; the result is gathered on rank 0 (other ranks return ``{}``). A sequence longer than
    ``data.seq_length`` is refused as the trainer refuses it.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from tqdm import tqdm

    from megatron_offgrpo.data import TrajectoryDataset
    from megatron_offgrpo.training.setup import build_training_objects, initialize_distributed
    from megatron_offgrpo.training.step import build_step_batch, make_forward_step, microbatch_logprobs

    initialize_distributed(cfg)
    objs = build_training_objects(cfg)
    for chunk in objs.model:
        chunk.eval()
    dataset = TrajectoryDataset(prefix, per_token_arrays=())
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    cp_size, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    d = cfg.data
    # pp microbatches per schedule keep the pipeline full; the last call is topped up with repeats (discarded).
    per_call = d.micro_batch_size * max(1, cfg.parallel.pp)
    mine = list(range(dp_rank, len(dataset), dp_size))
    calls = [mine[i : i + per_call] for i in range(0, len(mine), per_call)]
    # Every DP rank runs the same number of schedules: a rank with fewer sequences runs extra ones of repeated rows.
    n_calls = int(all_reduce_cpu(torch.tensor([len(calls)]), op=dist.ReduceOp.MAX))
    filler = mine[-1:] or [0]
    calls += [[]] * (n_calls - len(calls))
    keeps = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0

    def collect(mb, output, output_weight=None):
        logp = microbatch_logprobs(mb, output, cfg, objs.vocab_size, output_weight)
        return output.sum() * 0.0, {"logp": logp.detach().cpu()}

    results: Dict[int, np.ndarray] = {}
    for rows in tqdm(calls, desc=f"scoring {prefix}", disable=dist.get_rank() != 0):
        padded_rows = rows + (filler * per_call)[: per_call - len(rows)]
        samples = [dataset[i] for i in padded_rows]
        step = build_step_batch(samples, cfg, cp_size, cp_rank, reduce=False)
        forward_step = make_forward_step(cfg, None, 1.0, objs.vocab_size, collect=collect)
        iterators = [iter(step.microbatches) for _ in objs.model]
        with torch.no_grad():
            outputs = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iterators if len(objs.model) > 1 else iterators[0],
                model=objs.model, num_microbatches=len(step.microbatches), seq_length=d.seq_length,
                micro_batch_size=1 if d.packing else d.micro_batch_size, forward_only=True,
            )
        if not keeps:
            continue  # one rank per (DP, CP) coordinate keeps results
        position = 0
        for mb, out in zip(step.microbatches, outputs):
            for j in range(out["logp"].shape[0]):
                if position < len(rows):
                    i, n = rows[position], int(samples[position]["tokens"].numel())
                    where = _sequence_positions(mb, j, cp_size, cp_rank)
                    full = torch.zeros(where.numel() * cp_size)  # the padded sequence, >= n tokens
                    full[where] = out["logp"][j, : where.numel()]
                    arr = np.zeros(n, dtype=np.float32)
                    arr[1:] = full[: n - 1].numpy()  # the label at t is token t+1
                    results[i] = arr  # CP ranks hold disjoint positions (zeros elsewhere): summed on gather
                position += 1
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
