"""Token generation on top of `HybridLM.step`: the model sleeps whenever a window fills.

    for token in generate(model, prompt_ids, max_tokens=100, temperature=0.8, seed=0):
        print(tokenizer.decode([token]), end="", flush=True)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import mlx.core as mx
import numpy as np

from common.sampling import SamplingParams, sample_next
from sleep_mlx.model import HybridLM, State


def generate(model: HybridLM, prompt: Sequence[int], *, max_tokens: int = 100, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop: Sequence[int] = (),
             passes: int | None = None, state: State | None = None) -> Iterator[int]:
    """Yield up to max_tokens sampled token ids after `prompt` (stopping after a token in `stop`).

    `state` (updated in place) lets a caller continue a stream, e.g. a chat; None starts fresh.
    Sampling runs on numpy logits (common.sampling), so torch and MLX draw the same tokens.
    """
    params = SamplingParams(temperature, top_k, top_p)
    rng = np.random.default_rng(seed)
    state = model.new_state(1) if state is None else state
    if len(prompt) == 0:
        raise ValueError("empty prompt: give at least one token to condition on")
    logits, _ = model.step(mx.array([list(prompt)], dtype=mx.int32), state, passes=passes, last=True)
    for _ in range(max_tokens):
        token = int(sample_next(np.array(logits[:, -1].astype(mx.float32)), params, rng)[0])
        yield token
        if token in stop:
            return
        logits, _ = model.step(mx.array([[token]], dtype=mx.int32), state, passes=passes, last=True)
