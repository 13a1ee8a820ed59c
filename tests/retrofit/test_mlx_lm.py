"""The MLX backend against mlx-lm (a second, independent MLX implementation of the same source models).

Tiny random transformers models (Llama with GQA, untied and tied with llama3 rotary scaling; Qwen2 with q/k/v
biases; Qwen3 with q/k norm) are saved with save_pretrained; mlx_lm loads the saved folder, sleep_mlx loads its
retrofit (window longer than the sequence: no eviction; the inserted SSM blocks are exact no-ops), and the logits
of random token ids agree within 1e-4 relative in float32 for N in {1, 3}.

mlx-lm's llama.py and qwen2.py read the rotary settings from top-level `rope_theta` / `rope_scaling`, which
transformers 5 writes nested under `rope_parameters`: the oracle gets them lifted through load_model's
`model_config` override (the saved folder itself is left as transformers wrote it).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
pytest.importorskip("transformers")
pytest.importorskip("torch")

import sleep_mlx  # noqa: E402
from convert.retrofit import retrofit  # noqa: E402
from tests.retrofit.conftest import hf_model  # noqa: E402

RTOL = 1e-4
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
SOURCES = {
    "llama-gqa-untied": ("llama", dict(tie_word_embeddings=False, num_hidden_layers=4)),
    "llama-gqa-llama3-tied": ("llama", dict(tie_word_embeddings=True, rope_scaling=LLAMA3, num_hidden_layers=4)),
    "qwen2-bias": ("qwen2", dict(tie_word_embeddings=False, num_hidden_layers=4)),
    "qwen3-qknorm": ("qwen3", dict(tie_word_embeddings=False, head_dim=32, num_hidden_layers=4)),
}


def rel_err(ref, out) -> float:
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    return float(np.abs(ref - out).max() / np.abs(ref).max())


def load_mlx_lm(folder):
    """mlx_lm's model for a transformers-5 folder, rotary settings lifted to the keys mlx-lm reads."""
    config = json.loads((folder / "config.json").read_text())
    rope = config.get("rope_parameters") or {}
    lifted = {"rope_theta": rope.get("rope_theta", config.get("rope_theta", 10000.0)),
              "rope_scaling": rope or config.get("rope_scaling")}
    model, _ = mlx_lm_utils.load_model(folder, model_config=lifted)
    return model


@pytest.mark.parametrize("name", SOURCES)
def test_sleep_mlx_equals_mlx_lm(name, tmp_path):
    kind, overrides = SOURCES[name]
    source = tmp_path / "source"
    hf_model(kind, **overrides).save_pretrained(source)
    out = tmp_path / "retrofit"
    retrofit(source, out, window=64, insert_at=[1, 3], loop="all")
    ids = mx.array(np.random.default_rng(0).integers(0, 300, (2, 40)), dtype=mx.int32)
    ref = np.array(load_mlx_lm(source)(ids).astype(mx.float32))
    ours = sleep_mlx.load(out)
    for passes in (1, 3):
        err = rel_err(ref, np.array(ours(ids, passes=passes)))
        assert err <= RTOL, f"{name} N={passes}: rel err {err:.2e}"
