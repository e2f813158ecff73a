"""Helpers of tests/test_train_layouts.py: a tiny Qwen3-MoE model, its float64 reference, layout comparisons.

The MoE model is a Hugging Face ``Qwen3MoeForCausalLM`` with random weights, converted to the Megatron checkpoint
every run loads; ``transformers`` running it in float64 is the independent oracle of the router gradients.
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence

import torch

from train_helpers import STEP_METRICS, TINY_YAML, add_synthetic_reference, assert_same_step, read_jsonl
from train_helpers import read_weights_worker
from train_helpers import train_overrides as _overrides
from train_helpers import train_worker as _train_worker

# Tiny sizes, the tokenizer's vocabulary (261 tokens, pad 257), 4 experts with top-2 routing as in Qwen3-30B-A3B
# (norm_topk_prob), and a load-balancing coefficient large enough that its share of the router gradient is plain.
TINY_MOE = dict(
    vocab_size=261, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=2048,
    rms_norm_eps=1e-6, tie_word_embeddings=False, router_aux_loss_coef=0.05,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
)  # fmt: skip


def build_tiny_moe_hf(out_dir: str, seed: int = 0) -> str:
    """A random tiny ``Qwen3MoeForCausalLM`` saved (config.json + safetensors) in ``out_dir``.

    Every weight is random, norms included; the router weights are larger so that routing is decisive (no
    near-tie between the 2nd and 3rd expert that fp32 round-off of another layout could flip).
    """
    import transformers

    config = transformers.Qwen3MoeConfig(**TINY_MOE, attn_implementation="eager")
    model = transformers.Qwen3MoeForCausalLM(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
            else:
                std = 0.5 if name.endswith("mlp.gate.weight") else 0.1
                p.copy_(std * torch.randn(p.shape, generator=g))
    model.save_pretrained(out_dir)
    return out_dir


def build_moe_dataset(prefix: str, lengths: Sequence[int] = (32, 32, 32, 32)) -> str:
    """Two groups of 4 rollouts (prompts of 8 and 12 tokens, rollout ``i`` of ``lengths[i]`` tokens), rewards
    mixed in each group, plus a synthetic ``ref_logp``. Token ids lie in [0, 256): 257 (the tiny config's
    ``pad_token_id``) marks padding. With the default lengths no microbatch has padding, with or without pipeline
    parallelism (data.seq_length=32).
    """
    import numpy as np

    from megatron_offgrpo.data import TrajectoryDatasetWriter
    from megatron_offgrpo.data.writer import SequenceRecord

    rng = np.random.default_rng(1)
    with TrajectoryDatasetWriter(prefix, vocab_size=TINY_MOE["vocab_size"]) as writer:
        for g, prompt_len in enumerate([8, 12]):
            prompt = rng.integers(0, 256, size=prompt_len)
            rollouts = [SequenceRecord(np.concatenate([prompt, rng.integers(0, 256, size=n - prompt_len)]),
                                       prompt_len, float(i % 2 == 0), i) for i, n in enumerate(lengths)]
            writer.add_group({"problem_id": f"p{g}"}, rollouts)
        writer.commit()
    return add_synthetic_reference(prefix)


def router_grad_worker(rank: int, world: int, overrides: List[str]) -> Dict:
    """One training step through ``run_step`` (world of one); the router gradients it applied, its metrics and
    the microbatches it consumed, for the float64 reference. Needs ``optimizer.clip_grad=0`` (clipping would
    rescale the gradient buffers in place)."""
    from megatron_offgrpo.config import load_config
    from megatron_offgrpo.config.loader import required_arrays
    from megatron_offgrpo.data import GroupBatchSampler, TrajectoryDataset
    from megatron_offgrpo.training.loop import run_step
    from megatron_offgrpo.training.setup import build_training_objects, initialize_distributed
    from megatron_offgrpo.training.step import build_step_batch

    cfg = load_config(TINY_YAML, overrides)
    assert world == 1 and cfg.optimizer.clip_grad == 0
    initialize_distributed(cfg)
    objs = build_training_objects(cfg)
    dataset = TrajectoryDataset(cfg.data.train_prefix, per_token_arrays=required_arrays(cfg.loss))
    sampler = GroupBatchSampler(dataset.groups(), cfg.data.groups_per_batch, cfg.data.group_size, dp_rank=0,
                                dp_size=1, seed=cfg.data.seed)
    step = build_step_batch([dataset[i] for i in sampler.rank_batch(0)], cfg, 1, 0)
    metrics = run_step(cfg, objs, step)
    grads = {name: p.main_grad.detach().clone() for name, p in objs.model[0].module.named_parameters()
             if name.endswith("mlp.router.weight")}
    return {"metrics": metrics, "grads": grads, "step": step}


def reference_router_grads(hf_dir: str, step, cfg_loss: Dict, coeff: float, pad_token_id: int = 257):
    """Float64 ``transformers`` reference of one step's loss and router gradients, per layer.

    The objective, spelled out from its parts: the policy loss with the global denominators (docs/design.md §3, summed
    over microbatches) plus ``coeff`` times the mean over microbatches of the sum over layers of the Switch
    load-balancing loss ``E / (k T^2) * sum_i count_i * sum_x softmax(router logits_x)_i`` of the microbatch's
    ``T`` tokens (``count_i``: tokens whose top-k includes expert ``i``); padding positions (token id
    ``pad_token_id``, which the data never uses) are not tokens of the microbatch. Returns ``(policy loss, mean
    load-balancing loss per layer and microbatch, {layer: grad of the full objective}, {layer: grad of the
    policy loss alone})``.
    """
    import transformers

    from loss_reference import ref_logprobs, ref_policy_loss

    # Eager experts: transformers' default grouped matmul has no float64 kernel.
    model = transformers.Qwen3MoeForCausalLM.from_pretrained(hf_dir, dtype=torch.float64,
                                                             experts_implementation="eager").train(False)
    k, num_experts = model.config.num_experts_per_tok, model.config.num_experts
    gates = [layer.mlp.gate.weight for layer in model.model.layers]
    policy = torch.zeros((), dtype=torch.float64)
    balance = torch.zeros((), dtype=torch.float64)
    for mb in step.microbatches:
        out = model(input_ids=mb.tokens, position_ids=mb.position_ids, output_router_logits=True)
        logp = ref_logprobs(out.logits, mb.labels)
        policy = policy + ref_policy_loss(
            logp, mb.loss_mask, mb.advantages, cfg_loss["kind"], ref=mb.arrays.get("ref_logp"),
            clip_eps=cfg_loss["clip_eps"], kl_coef=cfg_loss["kl_coef"], agg=cfg_loss["agg"],
            num_sequences=step.num_sequences, num_tokens=step.num_tokens)
        real = (mb.tokens != pad_token_id).reshape(-1)  # right padding: the real tokens' logits are unaffected
        for logits in out.router_logits:  # [T, E] per layer
            probs = torch.softmax(logits.double()[real], dim=-1)
            counts = torch.zeros(num_experts, dtype=torch.float64).index_add_(
                0, probs.topk(k, dim=-1).indices.reshape(-1), torch.ones(probs.shape[0] * k, dtype=torch.float64))
            t = probs.shape[0]
            balance = balance + num_experts / (k * t * t) * (counts * probs.sum(dim=0)).sum()
    num_micro = len(step.microbatches)
    policy_grads = torch.autograd.grad(policy, gates, retain_graph=True)
    full_grads = torch.autograd.grad(policy + coeff * balance / num_micro, gates)
    layers = len(gates)
    return (policy.item(), balance.item() / (num_micro * layers), dict(enumerate(full_grads)),
            dict(enumerate(policy_grads)))


def convert_worker(rank: int, world: int, hf_dir: str, out_dir: str) -> None:
    """HF -> Megatron checkpoint (the initial weights of every MoE run)."""
    from megatron_offgrpo.models.converter import convert_hf_to_mcore

    convert_hf_to_mcore(hf_dir, out_dir, progress=False)


def run_moe_layouts(dataset: str, model: Dict[str, str], tmp: str, layouts: Dict, baseline: str,
                    **common) -> Dict[str, Dict]:
    """One step of the MoE model per layout (``name -> (world, overrides)``); assert that metrics (the router's
    load-balancing loss included) and every updated weight, read back at EP = TP = 1, equal the ``baseline``'s.

    Returns each layout's logged metrics of the step.
    """
    from megatron_offgrpo.utils.distributed import run_on_ranks

    results = {}
    model_overrides = {"model.architecture": model["hf"], "model.load": model["mcore"]}
    for name, (world, extra) in layouts.items():
        # Large Adam eps: the first update is ~linear in the gradient (see tests/test_train.py).
        overrides = _overrides(dataset, tmp, name, **{"optimizer.adam_eps": 1e-3, **model_overrides, **common,
                                                      **extra})
        results[name] = run_on_ranks(_train_worker, world, overrides)[0]
    read = _overrides(dataset, tmp, "read", **model_overrides)
    weights = run_on_ranks(read_weights_worker, 1, [r["checkpoint"] for r in results.values()], read)[0]

    base = results[baseline]["history"][0]
    base_w = weights[results[baseline]["checkpoint"]]
    assert base["loss"] != 0 and base["moe_aux_loss"] > 0
    for name, r in results.items():
        h = r["history"][0]
        assert read_jsonl(os.path.join(tmp, name, "logs", "metrics.jsonl"))[1]["moe_aux_loss"] == h["moe_aux_loss"]
        assert_same_step(name, h, base, weights[r["checkpoint"]], base_w, (*STEP_METRICS, "moe_aux_loss"))
    return {name: r["history"][0] for name, r in results.items()}
