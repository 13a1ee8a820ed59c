"""Sampling and generate(): greedy equals argmax of forward, seeds reproduce, filters hold."""

import numpy as np
import pytest
import torch

from common.config import ModelConfig
from common.sampling import SamplingParams, sample_next
from sleep_torch import HybridLM
from sleep_torch.generate import generate


def test_greedy_generation_matches_forward_argmax_across_sleeps():
    model = HybridLM(ModelConfig.from_name("debug", sleep_passes=3, window=5), seed=0).eval()
    prompt = [1, 2, 3]
    state = model.new_state(1)
    out = list(generate(model, prompt, max_tokens=17, state=state))
    assert state.sleeps >= 3  # 20 tokens through windows of 5
    seq = torch.tensor([prompt + out])
    with torch.no_grad():
        expected = model(seq)[0, len(prompt) - 1:-1].argmax(-1).tolist()
    assert out == expected


def test_seeded_sampling_is_reproducible_and_stop_works():
    model = HybridLM(ModelConfig.from_name("debug"), seed=0).eval()
    a = list(generate(model, [1], max_tokens=30, temperature=1.0, seed=7))
    b = list(generate(model, [1], max_tokens=30, temperature=1.0, seed=7))
    assert a == b and len(a) == 30
    stop = a[4]
    c = list(generate(model, [1], max_tokens=30, temperature=1.0, seed=7, stop=[stop]))
    assert c == a[: a.index(stop) + 1]
    with pytest.raises(ValueError, match="empty prompt"):
        list(generate(model, [], max_tokens=3))


def test_top_k_and_top_p_filters():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(sample_next(logits, SamplingParams(1.0, top_k=2), rng)[0]) for _ in range(300)}
    assert draws == {0, 1}
    draws = {int(sample_next(logits, SamplingParams(1.0, top_p=0.7), rng)[0]) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7 <= 0.8: the top two tokens
    draws = [int(sample_next(logits, SamplingParams(1.0), rng)[0]) for _ in range(4000)]
    assert abs(np.mean(np.array(draws) == 0) - 0.5) < 0.04
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(1.0, top_p=0.0)
