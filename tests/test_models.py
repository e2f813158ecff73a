"""Model providers: HF config parsing, vocab padding, QKV layout, layer-spec hook, TransformerConfig mapping.

In-process and fast; the end-to-end logit parity against ``transformers`` lives in tests/test_convert.py.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from megatron_offgrpo.models import (
    ModelArchitecture,
    UnsupportedArchitectureError,
    build_layer_spec,
    build_transformer_config,
    model_config_from_hf,
    padded_vocab_size,
    register_attention_backend,
    tiny_architecture,
)
from megatron_offgrpo.models.conversion import expected_hf_shapes, expected_mcore_shapes, pack_qkv, unpack_qkv


def _hf_dict(prefix: str, **kw) -> dict:
    """A config.json dict as transformers itself writes it (so the parser sees the real key names)."""
    return getattr(transformers, prefix + "Config")(**kw).to_dict()


def test_qwen2_config():
    arch = model_config_from_hf(_hf_dict("Qwen2", hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                                         intermediate_size=18944, num_hidden_layers=28, vocab_size=152064,
                                         rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                         tie_word_embeddings=False))  # fmt: skip
    assert (arch.family, arch.head_dim, arch.num_query_groups, arch.vocab_size) == ("qwen2", 128, 4, 152064)
    assert arch.qkv_bias and not arch.qk_norm and not arch.tie_word_embeddings and not arch.is_moe
    assert arch.rope_theta == 1e6 and arch.norm_eps == 1e-6


def test_qwen3_and_moe_config():
    arch = model_config_from_hf(_hf_dict("Qwen3", hidden_size=2048, num_attention_heads=32, head_dim=128,
                                         num_key_value_heads=4, tie_word_embeddings=True))  # fmt: skip
    assert arch.head_dim == 128 and arch.qk_norm and not arch.qkv_bias and arch.tie_word_embeddings
    moe = model_config_from_hf(_hf_dict("Qwen3Moe", num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                                        moe_intermediate_size=768))  # fmt: skip
    assert (moe.num_experts, moe.moe_router_topk, moe.moe_ffn_hidden_size, moe.moe_norm_topk_prob) == (128, 8, 768, True)


def test_classic_config_keys_from_the_hub():
    """Hub configs (transformers 4 era) spell rope theta as ``rope_theta`` and experts as ``num_experts``."""
    cfg = {"model_type": "qwen3_moe", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 16, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 100, "rope_theta": 1e6,
           "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": False,
           "rope_scaling": None}  # fmt: skip
    arch = model_config_from_hf(cfg)
    assert arch.rope_theta == 1e6 and arch.num_experts == 4 and not arch.moe_norm_topk_prob
    assert ModelArchitecture.from_dict(arch.to_dict()) == arch


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"model_type": "mistral"}, "mistral"),
        (_hf_dict("Qwen2", use_sliding_window=True), "sliding"),
        (_hf_dict("Llama", rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192}), "llama3"),  # fmt: skip
        (_hf_dict("Qwen3Moe", mlp_only_layers=[0]), "dense layers"),
        (_hf_dict("Llama", hidden_act="gelu"), "gelu"),
    ],
)
def test_unsupported_features_are_refused(cfg, match):
    with pytest.raises(UnsupportedArchitectureError, match=match):
        model_config_from_hf(cfg)


def test_padded_vocab_size():
    assert padded_vocab_size(151936, 1) == 151936  # already a multiple of 128
    assert padded_vocab_size(151665, 1) == 151680
    assert padded_vocab_size(200, 2) == 256
    assert padded_vocab_size(257, 1) == 384
    assert padded_vocab_size(152064, 8) == 152576
    with pytest.raises(ValueError):
        padded_vocab_size(0, 1)


def test_qkv_layout_is_per_query_group():
    """Fused rows = for each k/v head g: the q heads that share it (HF repeat_kv order), then k_g, then v_g."""
    arch = tiny_architecture()  # 4 heads, 2 groups, head_dim 16
    d, h = arch.head_dim, arch.hidden_size
    head_id = lambda n, base: torch.arange(n).repeat_interleave(d)[:, None].float().expand(-1, h) + base  # noqa: E731
    q, k, v = head_id(4, 0), head_id(2, 100), head_id(2, 200)
    fused = pack_qkv(arch, q, k, v)
    rows = fused[::d, 0].tolist()  # one entry per head-sized block
    assert rows == [0, 1, 100, 200, 2, 3, 101, 201]
    for a, b in zip(unpack_qkv(arch, fused), (q, k, v)):
        assert torch.equal(a, b)
    bias = pack_qkv(arch, q[:, 0], k[:, 0], v[:, 0])
    assert torch.equal(bias, fused[:, 0])


def test_expected_shapes_cover_both_sides():
    arch = model_config_from_hf(_hf_dict("Qwen3Moe", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, num_hidden_layers=2, num_experts=4, moe_intermediate_size=32,
                                         vocab_size=200, tie_word_embeddings=True))  # fmt: skip
    hf = expected_hf_shapes(arch)
    assert "lm_head.weight" not in hf and len([k for k in hf if ".experts." in k]) == 2 * 4 * 3
    mc = expected_mcore_shapes(arch, padded_vocab=256)
    assert mc["embedding.word_embeddings.weight"] == (256, 64)
    assert mc["decoder.layers.1.self_attention.linear_qkv.weight"] == ((4 + 2 * 2) * 16, 64)
    assert mc["decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight"] == (64, 64)
    assert "output_layer.weight" not in mc


def test_transformer_config_parity_settings():
    dense = build_transformer_config(model_config_from_hf(_hf_dict("Qwen2", hidden_size=64, num_attention_heads=4,
                                                                   num_key_value_heads=2, rms_norm_eps=1e-5)))
    assert dense.add_qkv_bias and not dense.add_bias_linear and not dense.qk_layernorm
    assert not dense.rotary_interleaved and not dense.apply_query_key_layer_scaling
    assert dense.layernorm_epsilon == 1e-5 and dense.kv_channels == 16 and dense.gated_linear_unit
    assert dense.num_moe_experts is None

    for norm_topk, pre_softmax in ((True, False), (False, True)):
        arch = model_config_from_hf(_hf_dict("Qwen3Moe", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=16, num_experts=4, num_experts_per_tok=2,
                                             norm_topk_prob=norm_topk))  # fmt: skip
        cfg = build_transformer_config(arch, params_dtype=torch.bfloat16)
        assert cfg.moe_router_pre_softmax is pre_softmax and cfg.moe_router_topk == 2
        assert cfg.moe_aux_loss_coeff == 0 and cfg.moe_router_dtype == "fp32" and cfg.bf16
        assert cfg.qk_layernorm and cfg.kv_channels == 16


def test_transformer_config_rejects_bad_tp():
    with pytest.raises(ValueError, match="tp=3"):
        build_transformer_config(tiny_architecture(), tp=3)


def test_layer_spec_attention_hook():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class FakeAttention(DotProductAttention):
        pass

    register_attention_backend("fake_for_test", lambda: FakeAttention)
    arch = tiny_architecture()
    default = build_layer_spec(arch, backend="local")
    swapped = build_layer_spec(arch, backend="local", attention_backend="fake_for_test")
    assert swapped.submodules.self_attention.submodules.core_attention is FakeAttention
    assert default.submodules.self_attention.submodules.core_attention is not FakeAttention
    with pytest.raises(ValueError, match="unknown attention backend"):
        build_layer_spec(arch, backend="local", attention_backend="nope")
