"""HybridLM (torch) against tests/reference.py, the float64 numpy model written from the SPEC.

`model(tokens)` and `model.step` in random splits, over the grid of tests.reference.grid(): both
evictions, the full looped range and a sub-range with a prelude and a coda, N = 1, 2, 3, both rules,
tied and untied heads, conv on and off; three full windows and a partial one. Weights are
tests.reference.random_weights (init weights are too gentle for small mistakes to show).

Tolerance: float32 model vs float64 reference, max|out - ref| <= RTOL * max|ref|. Measured over
the grid: at most 6e-6 relative (float32 rounding through 4-6 blocks and up to 3 passes); RTOL = 5e-5
leaves an 8x margin, while each mistake this file was checked against (the coda starting from the
running state, sliding eviction keeping L-2 keys, a changed RMSNorm eps) moves the logits far more.
A float64 model does not tighten this: the layers compute RMSNorm, rotary and the gates in float32
and keep the SSM state in float32 (SPEC section 2), so `model.double()` agrees to ~5e-6 as well.
"""

import numpy as np
import pytest
import torch

from common.config import ModelConfig
from sleep_torch import HybridLM
from tests.conftest import assert_close
from tests.reference import SEQ_LEN, grid, random_splits, random_weights, reference_logits

torch.set_num_threads(1)
RTOL = 5e-5
CASES = grid()


def model_and_weights(config, seed=1):
    weights = random_weights(config, seed)
    model = HybridLM(config, seed=None).eval()
    model.load_arrays(weights)
    return model, {name: p.detach().double().numpy() for name, p in model.named_parameters()}


def stream(model, tokens, splits):
    state, outs, i = model.new_state(tokens.shape[0]), [], 0
    for n in splits:
        logits, state = model.step(tokens[:, i:i + n], state)
        outs.append(logits)
        i += n
    return torch.cat(outs, 1)


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_forward_and_streaming_match_reference(case):
    config = CASES[case]
    model, weights = model_and_weights(config)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, SEQ_LEN))
    ref = reference_logits(config, weights, tokens)
    with torch.no_grad():
        full = model(torch.tensor(tokens))
        splits = random_splits(SEQ_LEN, seed=len(case), longest=config.window + 3)
        pieces = stream(model, torch.tensor(tokens), splits)
    assert_close(f"{case}: model(tokens)", ref, full, rtol=RTOL)
    assert_close(f"{case}: step in splits {splits}", ref, pieces, rtol=RTOL)


def test_passes_argument_overrides_config():
    config = CASES["sliding-loop1:4of6-N2-delta-tied-conv4"]
    model, weights = model_and_weights(config)
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (1, SEQ_LEN))
    with torch.no_grad():
        out = model(torch.tensor(tokens), passes=4)
    assert_close("passes=4", reference_logits(config, weights, tokens, passes=4), out, rtol=RTOL)


@pytest.mark.parametrize("scan_impl", ["ref", "chunk"])
def test_float64_model_matches_reference(scan_impl):
    """model.double() runs (float32 islands inside: see the module docstring) and still matches."""
    config = CASES["sliding-loop1:4of6-N3-delta-untied-conv0"]
    model, weights = model_and_weights(config)
    model.double()
    model.set_scan_impl(scan_impl)
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, (2, SEQ_LEN))
    with torch.no_grad():
        out = model(torch.tensor(tokens))
    assert out.dtype == torch.float64
    assert_close(f"float64 model, scan {scan_impl}", reference_logits(config, weights, tokens), out, rtol=RTOL)


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
        model = HybridLM(config, seed=0).eval()
        weights = {name: p.detach().double().numpy() for name, p in model.named_parameters()}
    else:
        model, weights = model_and_weights(config)
    tokens = np.random.default_rng(5).integers(0, config.vocab_size, (2, SEQ_LEN))
    ref = reference_logits(config, weights, tokens)
    moved = np.abs(reference_logits(config.replace(norm_eps=10 * eps), weights, tokens) - ref).max()
    assert moved > 100 * RTOL * np.abs(ref).max(), f"eps x10 moves the logits by only {moved:.1e}"
    with torch.no_grad():
        out = model(torch.tensor(tokens))
    assert_close(f"norm_eps={eps}", ref, out, rtol=RTOL)


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
    with torch.no_grad():
        assert_close("model at p", base, model(torch.tensor(tokens))[0, p], rtol=RTOL)
    for pos, in_reach in ((oldest, True), (oldest - 1, False)):
        changed = tokens.copy()
        changed[0, pos] = (changed[0, pos] + 1) % config.vocab_size
        with torch.no_grad():
            out = model(torch.tensor(changed))[0, p].double().numpy()
        assert_close(f"reference, token {pos} changed", reference_logits(config, weights, changed)[0, p], out,
                     rtol=RTOL)
        moved = np.abs(out - base).max() / np.abs(base).max()
        if in_reach:
            assert moved > 100 * RTOL, f"changing token {pos} (in reach of {p}) moved the logits by only {moved:.1e}"
        else:
            assert moved <= RTOL, f"changing token {pos} (out of reach of {p}) moved the logits by {moved:.1e}"
