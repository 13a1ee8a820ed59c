"""convert.gguf: a tiny GGUF written here (q/k permuted as llama.cpp does, F32/F16/Q8_0 tensors) read back against
the transformers model it came from and against transformers' own GGUF loader; refusals; the bundled SmolLM2 file."""

import json

import numpy as np
import pytest

from .conftest import SPECIALS, hf_model, state_numpy, write_tiny_gguf

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from convert.gguf import permute_qk, read_gguf, unpermute_qk  # noqa: E402


def test_permutation_inverse_and_interleaving():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2 * 8, 5)).astype(np.float32)  # 2 heads of head_dim 8
    assert np.array_equal(unpermute_qk(permute_qk(w, 2), 2), w)
    p = permute_qk(w, 2)
    # llama.cpp's interleaved rotary pairs rows (2i, 2i+1) = Hugging Face's rotate-half pair (i, i + d/2)
    assert np.array_equal(p[0::2][:4], w[:4]) and np.array_equal(p[1::2][:4], w[4:8])
    b = rng.standard_normal(16)
    assert np.array_equal(unpermute_qk(permute_qk(b, 2), 2), b)


def _expected(model):
    """What reading the file must give: the model's weights after the round trip through each stored type
    (F32 exact, lm_head F16-rounded, q_proj/up_proj Q8_0-quantized; q_proj quantized in its permuted order)."""
    from gguf.quants import dequantize, quantize

    out = {}
    for name, value in state_numpy(model).items():
        if ".q_proj." in name or ".up_proj." in name:  # stored Q8_0 (permuted for q: the permutation moves rows)
            heads = model.config.num_attention_heads
            stored = permute_qk(value, heads) if ".q_proj." in name else value
            back = dequantize(quantize(stored, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0)
            out[name] = unpermute_qk(back, heads) if ".q_proj." in name else back
        elif name == "lm_head.weight":
            out[name] = value.astype(np.float16).astype(np.float32)
        else:
            out[name] = value
    return out


def test_tiny_gguf_weights(tiny_gguf):
    model, path = tiny_gguf
    source = read_gguf(path)
    expected = _expected(model)
    assert sorted(source.tensors) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(source.tensors[name], value, err_msg=name)
    cfg = model.config
    a = source.arch
    assert (a.model_type, a.n_layers, a.hidden_size, a.n_heads, a.n_kv_heads, a.head_dim, a.intermediate_size) == (
        "llama", cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
        cfg.hidden_size // cfg.num_attention_heads, cfg.intermediate_size)
    assert a.vocab_size == cfg.vocab_size and not a.tie_embeddings and a.rope_theta == 10000.0
    assert a.rms_norm_eps == pytest.approx(cfg.rms_norm_eps, rel=1e-7)
    assert (a.bos_token_id, a.eos_token_ids) == (SPECIALS.index("<|im_start|>"), (SPECIALS.index("<|im_end|>"),))
    assert source.origin["format"] == "gguf" and len(source.origin["sha256"]) == 64
    assert source.chat_template.startswith("{% for message in messages %}")
    config = json.loads(source.files["tokenizer_config.json"])
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<|im_start|>", "<|im_end|>",
                                                                              "<|im_end|>")


def test_tiny_gguf_equals_transformers_gguf_loader(tiny_gguf):
    from transformers import AutoModelForCausalLM

    _, path = tiny_gguf
    theirs = state_numpy(AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name))
    ours = read_gguf(path, tokenizer=False).tensors
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_tied_gguf(tmp_path, tiny_bpe):
    _, tokens, merges = tiny_bpe
    model = hf_model("llama", seed=2, vocab_size=len(tokens), tie_word_embeddings=True, num_key_value_heads=4)
    path = write_tiny_gguf(tmp_path / "tied.gguf", model, tokens, merges, quantize=())
    source = read_gguf(path, tokenizer=False, hash_file=False)
    assert source.arch.tie_embeddings and "lm_head.weight" not in source.tensors
    for name, value in state_numpy(model).items():
        if name != "lm_head.weight":
            np.testing.assert_array_equal(source.tensors[name], value, err_msg=name)


def test_refusals(tmp_path, tiny_bpe, tiny_gguf):
    _, path = tiny_gguf
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    for bad in (cut, tmp_path / "short.gguf"):
        if bad.name == "short.gguf":
            bad.write_bytes(data[:100])
        with pytest.raises(ValueError, match="truncated") as e:
            read_gguf(bad)
        assert "\n" not in str(e.value)
    _, tokens, merges = tiny_bpe
    model = hf_model("llama", seed=3, vocab_size=len(tokens))
    other = write_tiny_gguf(tmp_path / "qwen.gguf", model, tokens, merges, architecture="qwen2")
    with pytest.raises(ValueError, match="general.architecture='qwen2'"):
        read_gguf(other)
    spm = write_tiny_gguf(tmp_path / "spm.gguf", model, tokens, merges, tokenizer_model="llama")
    with pytest.raises(ValueError, match="tokenizer.ggml.model='llama'"):
        read_gguf(spm)
    assert read_gguf(spm, tokenizer=False, hash_file=False).tensors  # weights alone are fine
    unknown = write_tiny_gguf(tmp_path / "pre.gguf", model, tokens, merges, pre="something-new")
    with pytest.raises(ValueError, match="tokenizer.ggml.pre='something-new'"):
        read_gguf(unknown)


@pytest.mark.slow
def test_smollm2_weights_equal_transformers_gguf_loader(smollm2_path):
    """Q4_1/Q8_0 dequantization and the q/k un-permutation on the real file (~1 min on 2 busy cores)."""
    from transformers import AutoModelForCausalLM

    theirs = state_numpy(AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name))
    source = read_gguf(smollm2_path, tokenizer=False, hash_file=False)
    assert theirs.pop("lm_head.weight") is not None and source.arch.tie_embeddings
    assert sorted(source.tensors) == sorted(theirs)
    for name, value in theirs.items():
        np.testing.assert_array_equal(source.tensors[name], value, err_msg=name)


def test_smollm2_architecture(smollm2_source):
    a = smollm2_source.arch
    assert (a.n_layers, a.hidden_size, a.n_heads, a.n_kv_heads, a.head_dim, a.intermediate_size, a.vocab_size) == (
        30, 576, 9, 3, 64, 1536, 49152)
    assert a.tie_embeddings and a.rope_theta == 100000.0 and a.max_position_embeddings == 8192
    assert (a.bos_token_id, a.eos_token_ids) == (1, (2,))
