"""generate() (MLX): greedy equals argmax of the full forward across sleeps; seeds reproduce."""

import pytest

mx = pytest.importorskip("mlx.core")

from common.config import ModelConfig  # noqa: E402
from sleep_mlx import HybridLM  # noqa: E402
from sleep_mlx.generate import generate  # noqa: E402


def test_greedy_generation_matches_forward_argmax_across_sleeps():
    model = HybridLM(ModelConfig.from_name("debug", sleep_passes=3, window=5), seed=0)
    prompt = [1, 2, 3]
    state = model.new_state(1)
    out = list(generate(model, prompt, max_tokens=17, state=state))
    assert state.sleeps >= 3  # 20 tokens through windows of 5
    expected = model(mx.array([prompt + out]))[0, len(prompt) - 1:-1].argmax(-1).tolist()
    assert out == expected


def test_seeded_sampling_is_reproducible_and_stop_works():
    model = HybridLM(ModelConfig.from_name("debug"), seed=0)
    a = list(generate(model, [1], max_tokens=30, temperature=1.0, seed=7))
    b = list(generate(model, [1], max_tokens=30, temperature=1.0, seed=7))
    assert a == b and len(a) == 30
    stop = a[4]
    c = list(generate(model, [1], max_tokens=30, temperature=1.0, seed=7, stop=[stop]))
    assert c == a[: a.index(stop) + 1]
    d = list(generate(model, [1], max_tokens=30, temperature=1.0, top_k=3, top_p=0.9, seed=8))
    assert len(d) == 30 and all(0 <= t < 16 for t in d)
    with pytest.raises(ValueError, match="empty prompt"):
        list(generate(model, [], max_tokens=3))
