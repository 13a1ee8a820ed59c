"""HybridLM (MLX) against tests/reference.py, the float64 numpy model written from the SPEC.

Mirrors tests/torch/test_reference.py: `model(tokens)` and `model.step` in random splits over the
grid of tests.reference.grid() (both evictions, full looped range and a sub-range with a prelude and
a coda, N = 1, 2, 3, both rules, tied and untied heads, conv on and off; three full windows and a
partial one), with tests.reference.random_weights.

Tolerance: max|out - ref| <= RTOL * max|ref|, measured at most 6e-6 relative over the grid in
float32; RTOL = 5e-5 leaves an 8x margin. No float64 model run: MLX computes float64 only on the
CPU and its exp is float32-accurate there (see tests/mlx/test_ops.py), and the layers keep RMSNorm
(mx.fast.rms_norm), rotary and the SSM state in float32, so it would not be tighter than float32.
"""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from mlx.utils import tree_flatten  # noqa: E402

from common.config import ModelConfig  # noqa: E402
from sleep_mlx import HybridLM  # noqa: E402
from tests.conftest import assert_close  # noqa: E402
from tests.reference import SEQ_LEN, grid, random_splits, random_weights, reference_logits  # noqa: E402

RTOL = 5e-5
CASES = grid()


def model_and_weights(config, seed=1):
    weights = random_weights(config, seed)
    model = HybridLM(config, seed=None)
    model.load_arrays(weights)
    return model, {name: np.array(p, dtype=np.float64) for name, p in tree_flatten(model.parameters())}


def stream(model, tokens, splits):
    state, outs, i = model.new_state(tokens.shape[0]), [], 0
    for n in splits:
        logits, state = model.step(tokens[:, i:i + n], state)
        outs.append(logits)
        i += n
    return mx.concatenate(outs, 1)


def run(model, tokens, passes=None):
    return model(mx.array(tokens, dtype=mx.int32), passes=passes)


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_forward_and_streaming_match_reference(case):
    config = CASES[case]
    model, weights = model_and_weights(config)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, SEQ_LEN))
    ref = reference_logits(config, weights, tokens)
    splits = random_splits(SEQ_LEN, seed=len(case), longest=config.window + 3)
    pieces = stream(model, mx.array(tokens, dtype=mx.int32), splits)
    assert_close(f"{case}: model(tokens)", ref, run(model, tokens), rtol=RTOL)
    assert_close(f"{case}: step in splits {splits}", ref, pieces, rtol=RTOL)


def test_passes_argument_overrides_config():
    config = CASES["sliding-loop1:4of6-N2-delta-tied-conv4"]
    model, weights = model_and_weights(config)
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (1, SEQ_LEN))
    ref = reference_logits(config, weights, tokens, passes=4)
    assert_close("passes=4", ref, run(model, tokens, passes=4), rtol=RTOL)


NORM_EPS = {  # id -> (norm_eps, weights): init weights have small activations, so eps matters
    "init-weights-eps1e-6": (1e-6, "init"),
    "random-weights-eps1e-2": (1e-2, "random"),
}


@pytest.mark.parametrize("case", NORM_EPS, ids=list(NORM_EPS))
def test_norm_eps_is_honoured(case):
    """RMSNorm and o_norm use config.norm_eps: a tenfold eps moves the reference far beyond RTOL
    (checked here), so a model that uses another eps fails the comparison."""
    eps, kind = NORM_EPS[case]
    config = CASES["hard-all-N2-delta-untied-conv0"].replace(norm_eps=eps)
    if kind == "init":
        model = HybridLM(config, seed=0)
        weights = {name: np.array(p, dtype=np.float64) for name, p in tree_flatten(model.parameters())}
    else:
        model, weights = model_and_weights(config)
    tokens = np.random.default_rng(5).integers(0, config.vocab_size, (2, SEQ_LEN))
    ref = reference_logits(config, weights, tokens)
    moved = np.abs(reference_logits(config.replace(norm_eps=10 * eps), weights, tokens) - ref).max()
    assert moved > 100 * RTOL * np.abs(ref).max(), f"eps x10 moves the logits by only {moved:.1e}"
    assert_close(f"norm_eps={eps}", ref, run(model, tokens), rtol=RTOL)


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_attention_reach_is_exactly_the_window(eviction):
    """One attention block, no SSM: the logits at position p depend on tokens p-L+1 .. p only
    (sliding), or on the window's own tokens only (hard). Changing the oldest token in reach must
    move the logits well beyond RTOL; changing the one just out of reach must not move them."""
    L = 8
    config = ModelConfig.from_name("debug", n_layers=1, pattern="A", window=L, eviction=eviction, sleep_passes=2)
    model, weights = model_and_weights(config)
    tokens = np.random.default_rng(4).integers(0, config.vocab_size, (1, 3 * L))
    p = 2 * L  # first token of the third window
    oldest = p - L + 1 if eviction == "sliding" else p
    base = reference_logits(config, weights, tokens)[0, p]
    assert_close("model at p", base, run(model, tokens)[0, p], rtol=RTOL)
    for pos, in_reach in ((oldest, True), (oldest - 1, False)):
        changed = tokens.copy()
        changed[0, pos] = (changed[0, pos] + 1) % config.vocab_size
        out = np.array(run(model, changed)[0, p], dtype=np.float64)
        assert_close(f"reference, token {pos} changed", reference_logits(config, weights, changed)[0, p], out,
                     rtol=RTOL)
        moved = np.abs(out - base).max() / np.abs(base).max()
        if in_reach:
            assert moved > 100 * RTOL, f"changing token {pos} (in reach of {p}) moved the logits by only {moved:.1e}"
        else:
            assert moved <= RTOL, f"changing token {pos} (out of reach of {p}) moved the logits by {moved:.1e}"
