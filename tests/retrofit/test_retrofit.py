"""Retrofitted models against transformers (the oracle): a retrofit starts exactly as good as its source.

Tiny random LlamaForCausalLM (GQA, llama3 rotary scaling, tied head), Qwen2ForCausalLM (q/k/v
biases, untied) and Qwen3ForCausalLM (q/k norm) are saved with save_pretrained, retrofitted, and
run in both backends:
- no eviction (the window longer than the sequence): logits equal transformers' for N in {1, 2, 4};
- hard eviction: each window's logits equal transformers run on that window alone;
- sliding eviction: logits equal transformers' with a banded causal mask of width L (every layer).
Tolerance: max |ours - transformers| <= 1e-4 * max |transformers| in float32.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
mx = pytest.importorskip("mlx.core")

import sleep_mlx  # noqa: E402
import sleep_torch  # noqa: E402
from common import retrofit as plan_mod  # noqa: E402
from common.pretrained import from_hf_config  # noqa: E402
from convert.retrofit import retrofit  # noqa: E402

RTOL = 1e-4
SOURCES = {
    "llama-gqa-llama3-tied": ("llama", dict(tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}, num_hidden_layers=4)),
    "qwen2-bias-untied": ("qwen2", dict(tie_word_embeddings=False, num_hidden_layers=4)),
    "qwen3-qknorm": ("qwen3", dict(tie_word_embeddings=False, head_dim=32, num_hidden_layers=4)),
}


def rel_err(ref, out) -> float:
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    return float(np.abs(ref - out).max() / np.abs(ref).max())


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


def ours(folder, backend: str, ids: np.ndarray, passes: int) -> np.ndarray:
    if backend == "torch":
        model = sleep_torch.load(folder).eval()
        with torch.no_grad():
            return model(torch.as_tensor(ids), passes=passes).numpy()
    model = sleep_mlx.load(folder)
    return np.array(model(mx.array(ids, dtype=mx.int32), passes=passes))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """name -> (transformers model, its saved folder)."""
    from tests.retrofit.conftest import hf_model

    out = {}
    for name, (kind, overrides) in SOURCES.items():
        model = hf_model(kind, **overrides)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (model, folder)
    return out


@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize("name", SOURCES)
def test_no_eviction_equals_the_source_for_any_n(sources, name, backend, tmp_path):
    model, folder = sources[name]
    out = tmp_path / "r"
    retrofit(folder, out, window=64, insert=1, loop="all")
    ids = np.random.default_rng(0).integers(0, 300, (2, 24))
    ref = hf_logits(model, ids)
    for passes in (1, 2, 4):
        err = rel_err(ref, ours(out, backend, ids, passes))
        assert err <= RTOL, f"{name} {backend} N={passes}: rel err {err:.2e}"


@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize("name", ["llama-gqa-llama3-tied", "qwen2-bias-untied"])
def test_hard_eviction_windows_equal_the_source_on_each_window(sources, name, backend, tmp_path):
    model, folder = sources[name]
    out, L = tmp_path / "r", 8
    retrofit(folder, out, window=L, passes=3, insert_at=[1, 3])
    ids = np.random.default_rng(1).integers(0, 300, (2, 3 * L + 5))
    logits = ours(out, backend, ids, 3)
    for start in range(0, ids.shape[1], L):
        ref = hf_logits(model, ids[:, start:start + L])
        err = rel_err(ref, logits[:, start:start + L])
        assert err <= RTOL, f"window at {start}: rel err {err:.2e}"


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_sliding_eviction_equals_the_source_with_a_band_of_width_l(sources, backend, tmp_path):
    model, folder = sources["qwen3-qknorm"]
    out, L = tmp_path / "r", 6
    retrofit(folder, out, window=L, passes=2, eviction="sliding")
    ids = np.random.default_rng(2).integers(0, 300, (2, 3 * L + 2))
    T = ids.shape[1]
    i = torch.arange(T)
    band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - L)  # token t sees t-L+1 .. t, in every layer
    with torch.no_grad():
        ref = model(torch.as_tensor(ids), attention_mask=band[None, None].expand(2, 1, T, T)).logits.numpy()
        full = model(torch.as_tensor(ids)).logits.numpy()
    assert rel_err(full, ref) > 1e-2  # the band matters for this sequence
    err = rel_err(ref, ours(out, backend, ids, 2))
    assert err <= RTOL, f"rel err {err:.2e}"


def test_retrofit_record_and_inserted_blocks_are_no_ops(sources, tmp_path):
    _, folder = sources["llama-gqa-llama3-tied"]
    out = tmp_path / "r"
    report = retrofit(folder, out, window=16, insert_at=[0, 2, 4], loop="1:3")
    doc = json.loads((out / "config.json").read_text())
    rec = doc["retrofit"]
    assert rec["source_layers"] == [None, 0, 1, None, 2, 3, None]
    assert rec["inserted"] == report["inserted"] == [0, 3, 6]
    assert doc["model"]["pattern"] == "SAASAAS" and doc["model"]["ssm_mlp"] is False
    assert doc["model"]["sleep_layers"] == [2, 5]  # source layers [1, 3): layer 1, the SSM in front of 2, layer 2
    model = sleep_torch.load(out)
    for i in rec["inserted"]:
        assert torch.count_nonzero(model.layers[i].ssm.o_proj.weight) == 0
        assert not hasattr(model.layers[i], "mlp")
    assert rec["source"]["format"] == "hf"


def test_copy_attn_copies_the_nearest_attention_qkv_with_repeated_kv_heads(sources, tmp_path):
    model, folder = sources["llama-gqa-llama3-tied"]  # 4 heads, 2 KV heads, head_dim 16
    out = tmp_path / "r"
    retrofit(folder, out, window=16, insert_at=[2], init="copy-attn")
    ours_model = sleep_torch.load(out)
    sd = model.state_dict()
    ssm = ours_model.layers[2].ssm  # in front of source layer 2: blocks 1 (layer 1) and 3 (layer 2) are nearest
    assert torch.equal(ssm.q_proj.weight, sd["model.layers.1.self_attn.q_proj.weight"])
    k = sd["model.layers.1.self_attn.k_proj.weight"].reshape(2, 16, -1)
    assert torch.equal(ssm.k_proj.weight, k.repeat_interleave(2, 0).reshape(64, -1))
    assert torch.count_nonzero(ssm.o_proj.weight) == 0


def test_plan_defaults_middle_half_and_quarter_of_the_layers():
    arch = from_hf_config(dict(model_type="llama", vocab_size=10, hidden_size=64, num_hidden_layers=28,
                               num_attention_heads=4, intermediate_size=96))
    p = plan_mod.plan(arch)
    assert p.loop == (7, 21) and len(p.inserted) == 7  # 28 / 4
    assert all(p.config.loop_range[0] <= i < p.config.loop_range[1] for i in p.inserted)
    assert plan_mod.plan(arch, loop="all").config.sleep_layers is None
    with pytest.raises(ValueError, match="--loop"):
        plan_mod.plan(arch, loop="9:3")
    with pytest.raises(ValueError, match="--insert-at"):
        plan_mod.plan(arch, insert_at=[29])


def test_convert_quantize_parity_and_memory_files_work_on_a_retrofitted_folder(sources, tmp_path):
    """convert, quantize, parity and memory files need nothing retrofit-specific."""
    from convert.convert import convert_path
    from convert.parity import parity

    _, folder = sources["qwen2-bias-untied"]
    out = tmp_path / "r"
    retrofit(folder, out, window=8, passes=2, insert=2)
    mlx_dir = tmp_path / "r-mlx"
    convert_path(out, mlx_dir, to="mlx")
    for name in ("tokenizer.json", "chat_template.jinja", "config.json"):
        assert (mlx_dir / name).exists() == (out / name).exists()
    assert json.loads((mlx_dir / "config.json").read_text())["retrofit"] == \
        json.loads((out / "config.json").read_text())["retrofit"]
    report = parity(out, tokens=20, gen_tokens=10)
    assert report.ok, report.format_table()
    convert_path(out, tmp_path / "r-q8", to="mlx", quantize_bits=8, group_size=32)
    assert sleep_mlx.load(tmp_path / "r-q8").config == sleep_torch.load(out).config
    t_model, m_model = sleep_torch.load(out).eval(), sleep_mlx.load(mlx_dir)
    ids = np.random.default_rng(3).integers(0, 300, (1, 13))
    with torch.no_grad():
        _, state = t_model.step(torch.as_tensor(ids[:, :11]), t_model.new_state(1))
        t_model.save_state(state, tmp_path / "mem.safetensors")
        expected, _ = t_model.step(torch.as_tensor(ids[:, 11:]), state)
    loaded = m_model.load_state(tmp_path / "mem.safetensors")  # written by torch, read by MLX
    got, _ = m_model.step(mx.array(ids[:, 11:], dtype=mx.int32), loaded)
    assert rel_err(expected.numpy(), np.array(got)) <= RTOL
