"""HybridLM (MLX): streaming == forward, sleep semantics, bounded State, names, laziness.

Mirrors tests/torch/test_model.py; Algorithm 1 itself is checked on the torch side and carried
over by tests/test_parity_forward.py (torch == MLX for the same weights).
"""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")

from mlx.utils import tree_flatten  # noqa: E402

from common.checkpoint import param_shapes  # noqa: E402
from common.config import ModelConfig  # noqa: E402
from sleep_mlx import HybridLM  # noqa: E402
from sleep_mlx.layers import rotary  # noqa: E402
from tests.conftest import assert_close  # noqa: E402


def make_model(seed=0, **overrides):
    base = dict(vocab_size=16, d_model=32, n_layers=4, pattern="AS", n_heads=2, head_dim=16, ssm_heads=2,
                ssm_head_dim=8, ssm_value_dim=16, mlp_hidden=48, window=6, sleep_passes=3)
    cfg = ModelConfig.from_dict({**base, **overrides})
    return HybridLM(cfg, seed=seed)


def randint(seed, shape, high=16):
    return mx.array(np.random.default_rng(seed).integers(0, high, shape), dtype=mx.int32)


CASES = {
    "hard-N1": dict(eviction="hard", sleep_passes=1),
    "hard-N3": dict(eviction="hard", sleep_passes=3),
    "sliding-N1": dict(eviction="sliding", sleep_passes=1),
    "sliding-N3": dict(eviction="sliding", sleep_passes=3),
    "hard-N3-loop1:3": dict(eviction="hard", sleep_passes=3, sleep_layers=[1, 3]),
    "sliding-N3-loop2:4": dict(eviction="sliding", sleep_passes=3, sleep_layers=[2, 4]),
    "hebbian-untied-noconv": dict(ssm_rule="hebbian", tie_embeddings=False, conv_size=0, sleep_passes=2),
}


def stream(model, tokens, splits, passes=None):
    state, outs, i = model.new_state(tokens.shape[0]), [], 0
    for n in splits:
        logits, state = model.step(tokens[:, i:i + n], state, passes=passes)
        outs.append(logits)
        i += n
    assert i == tokens.shape[1]
    return mx.concatenate(outs, 1), state


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("T", [23, 24], ids=["mid-window", "window-end"])
def test_streaming_equals_forward(case, T):
    model = make_model(**CASES[case])
    tokens = randint(1, (2, T))
    full = model(tokens)
    one, _ = stream(model, tokens, [1] * T)
    rng = np.random.default_rng(T)
    splits, left = [], T
    while left:
        n = min(left, int(rng.integers(1, 9)))
        splits.append(n)
        left -= n
    rand, _ = stream(model, tokens, splits)
    assert_close("one token at a time", full, one, atol=1e-5, rtol=0)
    assert_close(f"splits {splits}", full, rand, atol=1e-5, rtol=0)


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_sleep_changes_only_later_windows(eviction):
    model = make_model(eviction=eviction)
    tokens = randint(2, (2, 20))
    L = model.config.window
    n1, n3 = model(tokens, passes=1), model(tokens, passes=3)
    assert_close("first window, N=1 vs N=3", n1[:, :L], n3[:, :L], atol=0, rtol=0)
    assert mx.abs(n1[:, L:] - n3[:, L:]).max().item() > 1e-3, "sleep passes had no effect on later windows"


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_early_sleep_equals_lazy_sleep(eviction):
    model = make_model(eviction=eviction)
    L = model.config.window
    tokens = randint(3, (1, 2 * L + 3))
    lazy, lazy_state = stream(model, tokens, [L, L + 3])
    state = model.new_state(1)
    first, state = model.step(tokens[:, :L], state)
    assert state.due == 3 and state.sleeps == 0
    model.sleep(state)  # what a chat runs between turns
    assert state.due == 0 and state.sleeps == 1 and state.offset == 0
    second, state = model.step(tokens[:, L:], state)
    assert_close("early vs lazy sleep", lazy, mx.concatenate([first, second], 1), atol=0, rtol=0)
    for a, b in zip(lazy_state.tensors(), state.tensors()):
        assert a.shape == b.shape and mx.array_equal(a, b).item()


def test_due_sleep_uses_passes_of_the_call_that_filled_the_window():
    model = make_model(sleep_passes=1)
    L = model.config.window
    tokens = randint(4, (1, L + 4))
    expected = model(tokens, passes=3)
    state = model.new_state(1)
    a, state = model.step(tokens[:, :L], state, passes=3)  # fills the window: sleep due with N=3
    b, state = model.step(tokens[:, L:], state)  # default passes (1) for this call
    assert_close("due sleep keeps its passes", expected, mx.concatenate([a, b], 1), atol=1e-6, rtol=0)


def test_forced_sleep_starts_a_new_window():
    model = make_model()
    tokens = randint(5, (1, 4))
    _, state = model.step(tokens, model.new_state(1))
    assert model.sleep(state) is state and state.sleeps == 0  # nothing due: no-op
    model.sleep(state, force=True)
    assert state.sleeps == 1 and state.offset == 0 and state.seen == 4


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_state_memory_is_bounded(eviction):
    model = make_model(eviction=eviction)
    L = model.config.window
    state = model.new_state(2)
    sizes = {}
    for w in range(1, 21):
        _, state = model.step(randint(100 + w, (2, L)), state)
        sizes[w] = (len(state.tensors()), state.nbytes())
    assert state.sleeps == 19  # the 20th window's sleep is due, not yet run
    assert sizes[20] == sizes[2], f"state grew: {sizes[2]} -> {sizes[20]}"


def test_step_and_sleep_evaluate_the_state_and_forward_stays_lazy(monkeypatch):
    """step/sleep mx.eval the State they return (a stream's lazy graph stays bounded, a sleep runs
    when called); model(tokens) never evaluates (training differentiates through it)."""
    model = make_model(eviction="sliding")
    tokens = randint(9, (1, 2 * model.config.window))  # ends on a full window: a sleep is due
    evaluated, real_eval = [], mx.eval

    def recording_eval(*args):
        evaluated.extend(t for _, t in tree_flatten(list(args)))
        return real_eval(*args)

    monkeypatch.setattr(mx, "eval", recording_eval)
    model(tokens)
    assert evaluated == []
    state = model.new_state(1)
    for i in range(0, tokens.shape[1], 4):
        _, state = model.step(tokens[:, i:i + 4], state)
        assert all(any(t is e for e in evaluated) for t in state.tensors())
    assert state.due
    evaluated.clear()
    model.sleep(state)
    assert state.due == 0 and all(any(t is e for e in evaluated) for t in state.tensors())


def test_token_errors():
    model = make_model()
    state = model.new_state(1)
    with pytest.raises(ValueError, match="token id 16 out of range"):
        model.step(mx.array([[1, 16]]), state)
    with pytest.raises(ValueError, match="token id -1"):
        model(mx.array([[-1, 2]]))
    with pytest.raises(ValueError, match="integer array"):
        model.step(mx.zeros((1, 3)), state)
    with pytest.raises(ValueError, match="integer array"):
        model(np.zeros((1, 3), np.int32))
    with pytest.raises(ValueError, match="batch size"):
        model.step(mx.zeros((2, 3), dtype=mx.int32), state)
    with pytest.raises(ValueError, match="passes"):
        model(mx.zeros((1, 3), dtype=mx.int32), passes=0)


@pytest.mark.parametrize("overrides", [{}, dict(tie_embeddings=False, conv_size=0, n_layers=3)],
                         ids=["default", "untied-noconv"])
def test_names_and_shapes_are_canonical(overrides):
    model = make_model(**overrides)
    params = [(n, tuple(p.shape)) for n, p in tree_flatten(model.parameters())]
    assert dict(params) == param_shapes(model.config)
    assert [n for n, _ in params] == list(param_shapes(model.config))  # same order too


def test_same_seed_same_weights_different_seed_different():
    a, b, c = make_model(seed=1), make_model(seed=1), make_model(seed=2)
    pb = dict(tree_flatten(b.parameters()))
    for name, p in tree_flatten(a.parameters()):
        assert mx.array_equal(p, pb[name]).item(), name
    assert not mx.array_equal(a.embed.weight, c.embed.weight).item()


def test_rotary_matches_split_half_formula_for_negative_positions():
    x = mx.random.normal((2, 11, 3, 16), key=mx.random.key(0))
    positions = mx.arange(-5, 6)
    half = 8
    freqs = 10000.0 ** (-np.arange(half, dtype=np.float64) * 2 / 16)
    ang = np.arange(-5, 6, dtype=np.float64)[:, None] * freqs[None]
    cos = np.concatenate([np.cos(ang)] * 2, -1)[None, :, None]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[None, :, None]
    xn = np.array(x, dtype=np.float64)
    ref = xn * cos + np.concatenate([-xn[..., half:], xn[..., :half]], -1) * sin
    inv_freq = mx.array(ModelConfig(head_dim=16).rope_inv_freq(), dtype=mx.float32)
    assert_close("rotary", ref, rotary(x, positions, inv_freq), atol=2e-6, rtol=0)


def test_window_checkpointing_gives_same_loss_and_grads():
    model = make_model(sleep_passes=2)
    tokens = randint(6, (2, 20))

    def loss_fn(tokens):
        logits = model(tokens)[:, :-1].reshape(-1, 16)
        return nn.losses.cross_entropy(logits, tokens[:, 1:].reshape(-1), reduction="mean")

    calls, window = [0], model._window

    def counting_window(*args):
        calls[0] += 1
        return window(*args)

    model._window = counting_window
    results = []
    for flag in (False, True):
        calls[0] = 0
        model.checkpoint_windows = flag
        loss, grads = nn.value_and_grad(model, loss_fn)(tokens)
        mx.eval(loss, grads)
        results.append((loss, dict(tree_flatten(grads)), calls[0]))
    assert results[0][2] == 4 and results[1][2] == 8, "checkpointed windows are recomputed in backward"
    assert_close("loss", results[0][0], results[1][0], atol=1e-6, rtol=0)
    assert set(results[0][1]) == set(param_shapes(model.config))
    for name in results[0][1]:
        assert_close(name, results[0][1][name], results[1][1][name], atol=1e-6, rtol=1e-5)
    assert max(mx.abs(g).max().item() for g in results[0][1].values()) > 0


def test_scan_impls_agree_in_the_model():
    model = make_model(eviction="sliding")
    tokens = randint(7, (2, 20))
    model.set_scan_impl("ref")
    ref = model(tokens)
    model.set_scan_impl("chunk")
    chunk = model(tokens)
    assert_close("chunk vs ref scan inside the model", ref, chunk, atol=1e-5, rtol=0)
