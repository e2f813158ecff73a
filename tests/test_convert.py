"""HF <-> Megatron checkpoint conversion, checked against ``transformers`` as the independent oracle.

Tiny random models of every supported family are built locally (no download) with *all* weights random,
norm weights and biases included (HF initialises norms to 1 and biases to 0, which would hide a swapped
norm or a misplaced bias). The Megatron side runs in spawned gloo processes (the CPU backend patches
process-wide state, so it never runs inside the pytest process); one process group serves many checks to
keep spawn costs down.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_offgrpo.utils.distributed import run_on_ranks

VOCAB = 200  # padded to 256 (tp=2 x 128): the padded rows must be stripped
SEQ = 16
TOL = 1e-4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, attn_implementation="eager",
)  # fmt: skip
ROPE = lambda theta: {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}  # noqa: E731

# family name -> (transformers module attribute prefix, extra config kwargs)
FAMILIES = {
    "qwen2_tied": ("Qwen2", dict(tie_word_embeddings=True, rms_norm_eps=1e-6, **ROPE(1e6))),
    "qwen2_untied": ("Qwen2", dict(tie_word_embeddings=False, rms_norm_eps=1e-6, **ROPE(1e6))),
    # head_dim 32 != hidden / heads = 16, as in Qwen3-30B-A3B; non-default eps and theta.
    "qwen3": ("Qwen3", dict(head_dim=32, tie_word_embeddings=False, rms_norm_eps=1e-5, **ROPE(5e5))),
    "qwen3_moe": ("Qwen3Moe", dict(head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                   norm_topk_prob=True, **ROPE(1e6))),
    "qwen3_moe_nonorm": ("Qwen3Moe", dict(head_dim=16, moe_intermediate_size=32, num_experts=4,
                                          num_experts_per_tok=2, norm_topk_prob=False, **ROPE(1e6))),
    "llama": ("Llama", dict(tie_word_embeddings=False, rms_norm_eps=1e-5, **ROPE(10000.0))),
}  # fmt: skip
TP2_FAMILIES = ["qwen2_tied", "qwen2_untied", "qwen3"]
MOE = "qwen3_moe"


def _tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    t[0, :3] = torch.tensor([VOCAB - 1, VOCAB - 2, 0])  # the last real rows, next to the padding
    return t


def _build_hf(family: str, seed: int):
    import transformers

    prefix, extra = FAMILIES[family]
    config = getattr(transformers, prefix + "Config")(**COMMON, **extra)
    model = getattr(transformers, prefix + "ForCausalLM")(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                base = 1.0 if "norm" in name else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            else:
                # Larger router weights make routing decisive (no near-ties that fp noise could flip).
                std = 0.5 if name.endswith("mlp.gate.weight") else 0.1
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def _read_dir(d: str) -> dict:
    out = {}
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        out.update(load_file(f))
    return out


# ----------------------------------------------------------------------------------------------------------
# Workers (module level: run_on_ranks pickles them by reference)


def _tp1_worker(rank: int, world: int, root: str) -> dict:
    from megatron_offgrpo.models import (
        build_gpt_model, build_transformer_config, checkpoint_padded_vocab_size, load_model_checkpoint,
        model_config_from_hf,
    )  # fmt: skip
    from megatron_offgrpo.losses import vocab_parallel_logprobs
    from megatron_offgrpo.models.converter import convert_hf_to_mcore, convert_mcore_to_hf
    from megatron_offgrpo.models.parity import (
        gather_real_vocab_logits, megatron_next_token_logprobs, megatron_vocab_parallel_logits,
    )  # fmt: skip

    tokens = torch.load(os.path.join(root, "tokens.pt"))
    res: dict = {}

    def load(hf_dir, ckpt):
        arch = model_config_from_hf(hf_dir)
        model = build_gpt_model(arch, build_transformer_config(arch), vocab_size=checkpoint_padded_vocab_size(ckpt),
                                backend="local")  # fmt: skip
        load_model_checkpoint(model, ckpt)
        return arch, model

    for fam in FAMILIES:
        hf, ckpt = os.path.join(root, fam, "hf"), os.path.join(root, fam, "mcore")
        meta = convert_hf_to_mcore(hf, ckpt, tp=2, progress=False)
        arch, model = load(hf, ckpt)
        local = megatron_vocab_parallel_logits(model, tokens)
        r = {"logits": gather_real_vocab_logits(local, arch.vocab_size), "padded": meta["padded_vocab_size"],
             "vocab_size": meta["vocab_size"], "logprobs": megatron_next_token_logprobs(local, tokens, arch.vocab_size)}
        # Negative control: the same log-probs with the padded (zero-weight, logit 0) columns inside the softmax.
        r["logprobs_padding_in_softmax"] = vocab_parallel_logprobs(local[:, :-1], tokens[:, 1:])
        r["raw_vocab_dim"] = model.embedding.word_embeddings.weight.shape[0]
        if fam.startswith("qwen3_moe"):
            sd = model.state_dict()
            r["router0"] = sd["decoder.layers.0.mlp.router.weight"].clone()
            r["experts0"] = {
                e: (sd[f"decoder.layers.0.mlp.experts.local_experts.{e}.linear_fc1.weight"].clone(),
                    sd[f"decoder.layers.0.mlp.experts.local_experts.{e}.linear_fc2.weight"].clone())
                for e in range(arch.num_experts)
            }  # fmt: skip
        if fam == "qwen3":
            r["negative"] = _negative_controls(model, hf, tokens, arch)
        # Small shards force a multi-file export with a real index.
        convert_mcore_to_hf(ckpt, hf, os.path.join(root, fam, "export"), max_shard_bytes=64 * 1024, progress=False)
        res[fam] = r

    # bf16: convert the fp32 source to a bf16 checkpoint and export it (default dtype = the checkpoint's).
    hf = os.path.join(root, "qwen3", "hf")
    convert_hf_to_mcore(hf, os.path.join(root, "qwen3", "mcore_bf16"), dtype="bf16", progress=False)
    convert_mcore_to_hf(os.path.join(root, "qwen3", "mcore_bf16"), hf, os.path.join(root, "qwen3", "export_bf16"),
                        progress=False)  # fmt: skip

    # Errors: a tensor of the wrong shape; a template that is not the checkpoint's model.
    errors = {}
    try:
        convert_hf_to_mcore(os.path.join(root, "bad_shape"), os.path.join(root, "bad_shape_out"), progress=False)
    except Exception as e:  # the test checks the type and the message
        errors["bad_shape"] = (type(e).__name__, str(e))
    try:
        convert_mcore_to_hf(os.path.join(root, "qwen3", "mcore"), os.path.join(root, "llama", "hf"),
                            os.path.join(root, "bad_template_out"), progress=False)  # fmt: skip
    except Exception as e:
        errors["bad_template"] = (type(e).__name__, str(e))
    res["errors"] = errors
    return res


def _negative_controls(model, hf_dir: str, tokens: torch.Tensor, arch) -> dict:
    """Logits after deliberately wrong layouts: proves the parity check can see such bugs."""
    from megatron_offgrpo.models.parity import megatron_logits

    src = _read_dir(hf_dir)
    sd = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    out = {}
    with torch.no_grad():
        for i in range(arch.num_layers):
            p = f"model.layers.{i}.self_attn."
            naive = torch.cat([src[p + "q_proj.weight"], src[p + "k_proj.weight"], src[p + "v_proj.weight"]])
            model.decoder.layers[i].self_attention.linear_qkv.weight.copy_(naive)
        out["qkv_concatenated"] = megatron_logits(model, tokens, arch.vocab_size)
        model.load_state_dict(sd, strict=False)
        for i in range(arch.num_layers):
            w = model.decoder.layers[i].mlp.linear_fc1.weight
            w.copy_(torch.cat(torch.chunk(w.clone(), 2)[::-1]))
        out["gate_up_swapped"] = megatron_logits(model, tokens, arch.vocab_size)
        model.load_state_dict(sd, strict=False)
    return out


def _multi_rank_worker(rank: int, world: int, root: str) -> dict:
    from megatron.core import parallel_state

    from megatron_offgrpo.models import (
        build_gpt_model, build_transformer_config, checkpoint_padded_vocab_size, load_model_checkpoint,
        model_config_from_hf, save_model_checkpoint,
    )  # fmt: skip
    from megatron_offgrpo.models.parity import (
        gather_real_vocab_logits, megatron_next_token_logprobs, megatron_vocab_parallel_logits,
    )  # fmt: skip
    from megatron_offgrpo.utils.cpu_backend import initialize_cpu_model_parallel

    tokens = torch.load(os.path.join(root, "tokens.pt"))
    res: dict = {}

    def logits_of(fam, ckpt, **layout):
        arch = model_config_from_hf(os.path.join(root, fam, "hf"))
        cfg = build_transformer_config(arch, **layout)
        model = build_gpt_model(arch, cfg, vocab_size=checkpoint_padded_vocab_size(ckpt), backend="local")
        load_model_checkpoint(model, ckpt)
        local = megatron_vocab_parallel_logits(model, tokens)  # at TP=2, rank 1 holds all 56 padded columns
        logprobs = megatron_next_token_logprobs(local, tokens, arch.vocab_size)
        return model, gather_real_vocab_logits(local, arch.vocab_size), logprobs

    def relayout(**kw):
        parallel_state.destroy_model_parallel()
        initialize_cpu_model_parallel(**kw)

    initialize_cpu_model_parallel(tensor_model_parallel_size=2)
    for fam in TP2_FAMILIES:
        model, res[f"tp2/{fam}"], res[f"tp2_logprobs/{fam}"] = logits_of(fam, os.path.join(root, fam, "mcore"), tp=2)
        if fam in ("qwen3", "qwen2_tied"):
            save_model_checkpoint(model, os.path.join(root, fam, "written_tp2"))

    relayout(tensor_model_parallel_size=1)  # two data-parallel replicas
    for fam in ("qwen3", "qwen2_tied"):
        res[f"tp1_from_tp2/{fam}"] = logits_of(fam, os.path.join(root, fam, "written_tp2"))[1]

    relayout(expert_model_parallel_size=2)
    model, res["ep2"], _ = logits_of(MOE, os.path.join(root, MOE, "mcore"), ep=2)
    res["ep2_local_experts"] = len(model.decoder.layers[0].mlp.experts.local_experts)
    save_model_checkpoint(model, os.path.join(root, MOE, "written_ep2"))

    relayout(expert_model_parallel_size=1)
    res["ep1_from_ep2"] = logits_of(MOE, os.path.join(root, MOE, "written_ep2"))[1]
    return res


def _zero_padding_worker(rank: int, world: int) -> dict:
    """Random-init tiny models at TP=world, gather their vocab-parallel weights before / after zeroing."""
    import dataclasses

    from megatron_offgrpo.models import (
        build_gpt_model, build_transformer_config, tiny_architecture, zero_padded_vocab_rows,
    )  # fmt: skip
    from megatron_offgrpo.utils.cpu_backend import initialize_cpu_model_parallel

    initialize_cpu_model_parallel(tensor_model_parallel_size=world)

    def gathered(weight):  # the dense [V_padded, hidden] matrix from the vocab-parallel row shards
        parts = [torch.empty_like(weight) for _ in range(world)]
        torch.distributed.all_gather(parts, weight.detach().contiguous())
        return torch.cat(parts)

    res: dict = {}
    untied = tiny_architecture(vocab_size=VOCAB)
    for tied in (False, True):
        arch = dataclasses.replace(untied, tie_word_embeddings=tied)
        # 200: only rank 1's shard is padded at TP=2; 100: rank 0's is partly padded too; 256: nothing to zero.
        for real in (VOCAB, 100, 256):
            torch.manual_seed(0)
            model = build_gpt_model(arch, build_transformer_config(arch, tp=world), vocab_size=256, backend="local")
            weights = {"embedding": model.embedding.word_embeddings.weight}
            if not tied:
                weights["output"] = model.output_layer.weight
            before = {k: gathered(w) for k, w in weights.items()}
            zero_padded_vocab_rows(model, real)
            after = {k: gathered(w) for k, w in weights.items()}
            res[(tied, real)] = {"before": before, "after": after, "no_output": model.output_layer.weight is None}
    res["too_large"] = None
    try:
        zero_padded_vocab_rows(model, 257)
    except ValueError as e:
        res["too_large"] = str(e)
    return res


# ----------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """HF source models, their logits on fixed tokens, and the broken inputs for the error tests."""
    root = str(tmp_path_factory.mktemp("convert"))
    tokens = _tokens()
    torch.save(tokens, os.path.join(root, "tokens.pt"))
    hf_logits = {}
    for seed, fam in enumerate(FAMILIES):
        model = _build_hf(fam, seed)
        model.save_pretrained(os.path.join(root, fam, "hf"))
        with torch.no_grad():
            hf_logits[fam] = model(input_ids=tokens).logits.float()
    # A fake tokenizer file: the exporter must copy non-weight files from the template.
    with open(os.path.join(root, "qwen3", "hf", "tokenizer_config.json"), "w") as f:
        json.dump({"marker": "copied"}, f)
    bad = os.path.join(root, "bad_shape")
    shutil.copytree(os.path.join(root, "qwen3", "hf"), bad)
    tensors = load_file(os.path.join(bad, "model.safetensors"))
    tensors["model.layers.1.self_attn.k_proj.weight"] = tensors["model.layers.1.self_attn.k_proj.weight"][:-1]
    save_file(tensors, os.path.join(bad, "model.safetensors"), metadata={"format": "pt"})
    return {"root": root, "tokens": tokens, "hf_logits": hf_logits}


@pytest.fixture(scope="module")
def tp1(workdir):
    return run_on_ranks(_tp1_worker, 1, workdir["root"])[0]


@pytest.fixture(scope="module")
def multi(workdir, tp1):
    results = run_on_ranks(_multi_rank_worker, 2, workdir["root"])
    return results


def _assert_close(reference: torch.Tensor, other: torch.Tensor, tol: float = TOL) -> None:
    assert reference.shape == other.shape, (reference.shape, other.shape)
    diff = (reference - other).abs().max().item()
    assert diff <= tol, f"max abs logit diff {diff:.3e} > {tol}"
    assert torch.equal(reference.argmax(-1), other.argmax(-1))


# ----------------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_is_bit_exact(workdir, tp1, family):
    src = _read_dir(os.path.join(workdir["root"], family, "hf"))
    out = _read_dir(os.path.join(workdir["root"], family, "export"))
    assert sorted(out) == sorted(src)
    for name, t in src.items():
        assert out[name].dtype == t.dtype, name
        assert torch.equal(out[name], t), f"{name} differs after HF -> Megatron -> HF"


@pytest.mark.parametrize("family", ["qwen2_tied", "qwen3_moe"])
def test_export_loads_in_transformers(workdir, tp1, family):
    from transformers import AutoModelForCausalLM

    d = os.path.join(workdir["root"], family, "export")
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    model, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        logits = model(input_ids=workdir["tokens"]).logits
    assert torch.equal(logits, workdir["hf_logits"][family])


def test_export_copies_template_files(workdir, tp1):
    d = os.path.join(workdir["root"], "qwen3", "export")
    with open(os.path.join(d, "tokenizer_config.json")) as f:
        assert json.load(f) == {"marker": "copied"}
    assert os.path.exists(os.path.join(d, "generation_config.json"))
    assert not os.path.exists(os.path.join(d, "model.safetensors"))  # the template's weights are not copied


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tp1_logits_match_hf(workdir, tp1, family):
    r = tp1[family]
    assert r["padded"] == 256 and r["raw_vocab_dim"] == 256  # padded for tp=2, stripped by megatron_logits
    _assert_close(workdir["hf_logits"][family], r["logits"])


def test_converted_checkpoint_records_real_vocab(workdir, tp1):
    from megatron_offgrpo.models import checkpoint_padded_vocab_size, checkpoint_vocab_size

    for fam in FAMILIES:
        ckpt = os.path.join(workdir["root"], fam, "mcore")
        with open(os.path.join(ckpt, "offgrpo_model.json")) as f:
            meta = json.load(f)
        assert meta["vocab_size"] == VOCAB and meta["padded_vocab_size"] == 256, fam
        assert meta["architecture"]["vocab_size"] == VOCAB, fam  # the architecture is kept as well
        assert tp1[fam]["vocab_size"] == VOCAB
        assert checkpoint_vocab_size(ckpt) == VOCAB and checkpoint_padded_vocab_size(ckpt) == 256


def test_checkpoint_vocab_size_fallback_and_errors(workdir, tp1, tmp_path):
    from megatron_offgrpo.models import (
        CheckpointFormatError, CorruptCheckpointFileError, MissingCheckpointFileError, checkpoint_vocab_size,
    )  # fmt: skip

    with open(os.path.join(workdir["root"], "qwen3", "mcore", "offgrpo_model.json")) as f:
        meta = json.load(f)
    path = tmp_path / "offgrpo_model.json"

    del meta["vocab_size"]  # metadata written before the key existed: the architecture's value
    path.write_text(json.dumps(meta))
    assert checkpoint_vocab_size(str(tmp_path)) == VOCAB

    del meta["architecture"]
    path.write_text(json.dumps(meta))
    with pytest.raises(CorruptCheckpointFileError, match="records neither vocab_size nor architecture") as e:
        checkpoint_vocab_size(str(tmp_path))
    assert str(path) in str(e.value) and e.value.path == str(path)

    path.write_text('{"vocab_size": 12')  # truncated JSON
    with pytest.raises(CorruptCheckpointFileError, match="offgrpo_model.json is damaged"):
        checkpoint_vocab_size(str(tmp_path))

    path.unlink()
    with pytest.raises(MissingCheckpointFileError) as e:
        checkpoint_vocab_size(str(tmp_path))
    assert str(path) in str(e.value) and isinstance(e.value, (CheckpointFormatError, FileNotFoundError))


def test_logprobs_match_hf_over_real_vocab(workdir, tp1):
    """Next-token log-probs (the trainer's vocab_parallel_logprobs, real vocab) vs HF's float64 log_softmax."""
    from megatron_offgrpo.models.parity import compare_logprobs, reference_next_token_logprobs

    tokens = workdir["tokens"]
    for fam in FAMILIES:
        ref = reference_next_token_logprobs(workdir["hf_logits"][fam], tokens)
        assert compare_logprobs(ref, tp1[fam]["logprobs"])["max_abs_logprob_diff"] <= TOL, fam
        # The check sees padding inside the softmax, which stripping logits before comparing cannot.
        assert compare_logprobs(ref, tp1[fam]["logprobs_padding_in_softmax"])["max_abs_logprob_diff"] > 100 * TOL, fam


@pytest.mark.parametrize("world", [1, 2])
def test_zero_padded_vocab_rows_matches_dense_expectation(world):
    results = run_on_ranks(_zero_padding_worker, world)
    for rank, res in enumerate(results):
        assert "must be in [1, 256]" in (res["too_large"] or "no error")
        for (tied, real), r in ((k, v) for k, v in res.items() if isinstance(k, tuple)):
            assert r["no_output"] == tied  # tied at PP=1: the output layer reuses the embedding
            assert set(r["after"]) == ({"embedding"} if tied else {"embedding", "output"})
            for name, before in r["before"].items():
                assert before.shape == (256, 64)
                assert (before[real:] != 0).any() or real == 256, "random init left the padding zero: vacuous"
                expected = before.clone()
                expected[real:] = 0
                assert torch.equal(r["after"][name], expected), (rank, tied, real, name)


def test_parity_check_detects_layout_bugs(workdir, tp1):
    """Negative controls: a naive [q; k; v] concatenation or swapped gate/up must fail the parity check."""
    ref = workdir["hf_logits"]["qwen3"]
    for name, logits in tp1["qwen3"]["negative"].items():
        assert (ref - logits).abs().max().item() > 100 * TOL, name


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_moe_nonorm"])
def test_moe_router_and_expert_order_preserved(workdir, tp1, family):
    src = _read_dir(os.path.join(workdir["root"], family, "hf"))
    r = tp1[family]
    assert torch.equal(r["router0"], src["model.layers.0.mlp.gate.weight"])
    for e, (fc1, fc2) in r["experts0"].items():
        p = f"model.layers.0.mlp.experts.{e}."
        assert torch.equal(fc1, torch.cat([src[p + "gate_proj.weight"], src[p + "up_proj.weight"]])), e
        assert torch.equal(fc2, src[p + "down_proj.weight"]), e


def test_bf16_export_within_bf16_rounding(workdir, tp1):
    src = _read_dir(os.path.join(workdir["root"], "qwen3", "hf"))
    d = os.path.join(workdir["root"], "qwen3", "export_bf16")
    out = _read_dir(d)
    assert sorted(out) == sorted(src)
    for name, t in src.items():
        assert out[name].dtype == torch.bfloat16, name
        assert torch.equal(out[name], t.to(torch.bfloat16)), name  # exactly one rounding, no double rounding
        rel = ((out[name].float() - t).abs() / t.abs().clamp_min(1e-30)).max().item()
        assert rel <= 2.0**-8, (name, rel)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["torch_dtype"] == "bfloat16"


def test_mismatched_shape_names_the_tensor(tp1):
    kind, msg = tp1["errors"]["bad_shape"]
    assert kind == "ShapeMismatchError"
    assert "model.layers.1.self_attn.k_proj.weight" in msg and "(63, 64)" in msg and "(64, 64)" in msg  # head_dim 32 x 2 groups


def test_wrong_template_is_refused(tp1):
    kind, msg = tp1["errors"]["bad_template"]
    assert kind == "ShapeMismatchError" and "family" in msg


def test_unsupported_architecture_is_refused(tmp_path):
    from megatron_offgrpo.models import UnsupportedArchitectureError
    from megatron_offgrpo.models.converter import convert_hf_to_mcore

    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, f)
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        convert_hf_to_mcore(str(tmp_path), str(tmp_path / "out"), progress=False)


@pytest.mark.parametrize("family", TP2_FAMILIES)
def test_tp2_logits_match_hf(workdir, multi, family):
    for rank_result in multi:
        _assert_close(workdir["hf_logits"][family], rank_result[f"tp2/{family}"])


@pytest.mark.parametrize("family", TP2_FAMILIES)
def test_tp2_logprobs_match_hf_over_real_vocab(workdir, multi, family):
    from megatron_offgrpo.models.parity import compare_logprobs, reference_next_token_logprobs

    ref = reference_next_token_logprobs(workdir["hf_logits"][family], workdir["tokens"])
    for rank_result in multi:
        assert compare_logprobs(ref, rank_result[f"tp2_logprobs/{family}"])["max_abs_logprob_diff"] <= TOL


@pytest.mark.parametrize("family", ["qwen3", "qwen2_tied"])
def test_checkpoint_written_at_tp2_loads_at_tp1(workdir, multi, family):
    ref = workdir["hf_logits"][family]
    for rank_result in multi:
        _assert_close(ref, rank_result[f"tp1_from_tp2/{family}"])


def test_moe_ep2_logits_match_hf_and_reload_at_ep1(workdir, multi):
    ref = workdir["hf_logits"][MOE]
    for rank_result in multi:
        assert rank_result["ep2_local_experts"] == 4  # 8 experts split over 2 ranks
        _assert_close(ref, rank_result["ep2"])
        _assert_close(ref, rank_result["ep1_from_ep2"])


def test_clis_end_to_end(workdir, tp1, tmp_path):
    """The three CLIs chained on the tiny Qwen3 (one subprocess each, as a user would run them)."""
    hf = os.path.join(workdir["root"], "qwen3", "hf")
    tools = os.path.join(REPO, "tools", "checkpoint")
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(script, *args):
        return subprocess.run([sys.executable, os.path.join(tools, script), *args], capture_output=True, text=True,
                              env=env, timeout=300)  # fmt: skip

    p = run("hf_to_mcore.py", "--hf-dir", hf, "--out", str(tmp_path / "mc"), "--tp", "2", "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    p = run("check_parity.py", "--hf-dir", hf, "--ckpt", str(tmp_path / "mc"), "--seq-len", "8")
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["max_abs_diff"] <= TOL and result["top1_agreement"] == 1.0
    assert result["max_abs_logprob_diff"] <= TOL and result["vocab_size"] == VOCAB
    p = run("mcore_to_hf.py", "--ckpt", str(tmp_path / "mc"), "--hf-template", hf, "--out", str(tmp_path / "hf"),
            "--no-progress")  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    src, out = _read_dir(hf), _read_dir(str(tmp_path / "hf"))
    assert sorted(src) == sorted(out) and all(torch.equal(src[k], out[k]) for k in src)
