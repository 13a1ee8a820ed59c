"""common.pretrained: config mapping, refusals, rotary frequencies against transformers, the name table."""

import json

import numpy as np
import pytest

from common.pretrained import (CANONICAL_TO_HF, HF_TO_CANONICAL, SourceArch, canonical_to_hf, expected_hf_shapes,
                               from_hf_config, hf_to_canonical, rope_inv_freq)

from .conftest import TINY, hf_config, hf_model

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

# (id, model_type, transformers config overrides)
VARIANTS = [
    ("llama-default", "llama", {}),
    ("llama-tied-mha", "llama", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    ("llama-head-dim", "llama", {"head_dim": 32}),
    ("llama-linear", "llama", {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}}),
    ("llama-llama3", "llama", {"rope_parameters": dict(LLAMA3_ROPE, rope_theta=5e5)}),
    ("mistral", "mistral", {}),
    ("qwen2", "qwen2", {"use_sliding_window": False, "sliding_window": 4096}),
    ("qwen3", "qwen3", {"head_dim": 32, "tie_word_embeddings": True}),
]


def saved_config(tmp_path, model_type, overrides) -> dict:
    """config.json as transformers writes it (its own spelling: rope_parameters in transformers 5)."""
    hf_config(model_type, **overrides).save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("model_type,overrides", [v[1:] for v in VARIANTS], ids=[v[0] for v in VARIANTS])
def test_from_hf_config_matches_transformers(tmp_path, model_type, overrides):
    pytest.importorskip("transformers")
    cfg = saved_config(tmp_path, model_type, overrides)
    arch = from_hf_config(cfg)
    tc = hf_config(model_type, **overrides)
    assert arch.model_type == model_type
    assert (arch.vocab_size, arch.hidden_size, arch.n_layers, arch.n_heads, arch.n_kv_heads) == (
        tc.vocab_size, tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads)
    assert arch.head_dim == (getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads)
    assert arch.intermediate_size == tc.intermediate_size and arch.rms_norm_eps == tc.rms_norm_eps
    assert arch.tie_embeddings == tc.tie_word_embeddings
    assert arch.attn_bias == (model_type == "qwen2") and arch.qk_norm == (model_type == "qwen3")
    assert arch.rope_theta == tc.rope_parameters["rope_theta"]
    assert arch.rope_scaling.type == tc.rope_parameters["rope_type"]
    assert SourceArch.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch


def test_transformers4_spelling():
    """Older config.json files: rope_theta + rope_scaling (with "type" or "rope_type"), eos as a list."""
    cfg = {"model_type": "llama", **TINY, "rope_theta": 500000.0, "eos_token_id": [5, 7], "bos_token_id": 1,
           "rope_scaling": dict(LLAMA3_ROPE, rope_type=None, type="llama3")}
    arch = from_hf_config(cfg)
    assert arch.rope_theta == 5e5 and arch.rope_scaling.type == "llama3" and arch.rope_scaling.factor == 8.0
    assert arch.rope_scaling.original_max_position_embeddings == 64 and arch.eos_token_ids == (5, 7)
    cfg["rope_scaling"] = {"type": "linear", "factor": 2.0}
    assert from_hf_config(cfg).rope_scaling.factor == 2.0
    cfg["rope_scaling"] = None
    assert from_hf_config(cfg).rope_scaling.type == "default"


REFUSED = [
    ("model_type", {"model_type": "gemma2"}),
    ("mlp_bias", {"mlp_bias": True}),
    ("attention_bias", {"attention_bias": True}),
    ("sliding_window", {"model_type": "mistral", "sliding_window": 4096}),
    ("use_sliding_window", {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64,
                            "max_window_layers": 1}),
    ("layer_types", {"model_type": "qwen3", "layer_types": ["full_attention", "sliding_attention"]}),
    ("rope_scaling.rope_type", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}),
    ("rope_parameters.rope_type", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}),
    ("quantization_config", {"quantization_config": {"quant_method": "gptq", "bits": 4}}),
    ("hidden_act", {"hidden_act": "gelu"}),
    ("partial_rotary_factor", {"partial_rotary_factor": 0.5}),
    ("num_attention_heads", {"num_key_value_heads": 3}),
]


@pytest.mark.parametrize("field,change", REFUSED, ids=[r[0] for r in REFUSED])
def test_refusals_name_the_field(field, change):
    cfg = {"model_type": "llama", **TINY, **change}
    with pytest.raises(ValueError) as e:
        from_hf_config(cfg)
    msg = str(e.value)
    assert "\n" not in msg and field in msg, msg


@pytest.mark.parametrize("rope", ["default", "linear", "llama3"])
@pytest.mark.parametrize("head_dim", [16, 64])
def test_rope_inv_freq_equals_transformers(rope, head_dim):
    pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"default": {"rope_type": "default"}, "linear": {"rope_type": "linear", "factor": 3.0},
              "llama3": dict(LLAMA3_ROPE)}[rope]
    params["rope_theta"] = 10000.0 if rope == "default" else 5e5
    model = hf_model("llama", head_dim=head_dim, rope_parameters=params)
    arch = from_hf_config(model.config.to_dict())
    ours = rope_inv_freq(arch)
    assert ours.dtype == np.float64 and ours.shape == (head_dim // 2,)
    # transformers computes the same formula in float32: equal up to a few float32 ulps (llama3's smoothing adds 2)
    theirs = model.model.rotary_emb.inv_freq.double().numpy()
    np.testing.assert_allclose(ours, theirs, rtol=5e-7, atol=0)
    if rope != "default":
        init, _ = ROPE_INIT_FUNCTIONS[rope](model.config, None)
        np.testing.assert_allclose(ours, init.double().numpy(), rtol=5e-7, atol=0)
    if rope == "llama3":  # all three bands are exercised by this config
        base = 1.0 / params["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
        ratio = base / ours
        assert np.isclose(ratio, 1).any() and np.isclose(ratio, 8).any() and ((ratio > 1.01) & (ratio < 7.9)).any()


def test_name_table_round_trip_and_layer_shift():
    assert CANONICAL_TO_HF == {v: k for k, v in HF_TO_CANONICAL.items()}
    arch = SourceArch("qwen2", 50, 32, 3, 4, 2, 8, 64, 1e-6, 1e4, attn_bias=True)
    shift = {0: 0, 1: 2, 2: 4}  # an SSM block inserted after every source layer
    inverse = {v: k for k, v in shift.items()}
    for name in expected_hf_shapes(arch):
        canonical = hf_to_canonical(name, shift)
        assert canonical_to_hf(canonical, inverse) == name
    assert hf_to_canonical("model.layers.2.self_attn.q_proj.bias", shift) == "layers.4.attn.q_proj.bias"
    assert hf_to_canonical("model.layers.1.input_layernorm.weight", lambda j: j + 10) == "layers.11.norm1.weight"
    assert hf_to_canonical("model.layers.0.self_attn.k_norm.weight") == "layers.0.attn.k_norm.weight"
    assert hf_to_canonical("model.embed_tokens.weight", shift) == "embed.weight"
    assert hf_to_canonical("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    with pytest.raises(ValueError, match="unknown tensor"):
        hf_to_canonical("model.layers.0.mlp.experts.0.w1.weight")


def test_expected_shapes_match_transformers_state_dict():
    pytest.importorskip("transformers")
    for model_type, overrides in [("llama", {"tie_word_embeddings": True}), ("qwen2", {}),
                                  ("qwen3", {"head_dim": 32})]:
        model = hf_model(model_type, **overrides)
        arch = from_hf_config(model.config.to_dict())
        theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if arch.tie_embeddings:
            theirs.pop("lm_head.weight")
        assert expected_hf_shapes(arch) == theirs, model_type
