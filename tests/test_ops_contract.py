"""ops.ssm_scan's public contract, checked the same way in both backends.

T = 0 (an empty streaming step): o is [B, 0, H, Dv] in v's dtype, the state is the initial state
(zeros when None) in the compute dtype, for every impl; and both backends reject bad arguments with
the same ValueError message.
"""
import importlib

import numpy as np
import pytest

B, H, DK, DV = 2, 3, 8, 4
IMPLS = ["auto", "ref", "chunk"]


class Backend:
    """The few framework calls the tests need, so that each test body is written once."""

    def __init__(self, name):
        self.name = name
        if name == "torch":
            self.fw = importlib.import_module("torch")
        else:
            self.fw = pytest.importorskip("mlx.core")
        self.ops = importlib.import_module(f"sleep_{name}.ops")

    def array(self, x, dtype="float32"):
        if self.name == "torch":
            return self.fw.tensor(x).to(getattr(self.fw, dtype))
        return self.fw.array(x).astype(getattr(self.fw, dtype))

    def numpy(self, x):
        if self.name == "torch":
            return x.detach().double().numpy()
        return np.array(x.astype(self.fw.float32 if x.dtype != self.fw.float64 else x.dtype), dtype=np.float64)

    def dtype(self, name):
        return getattr(self.fw, name)

    def kernel_available(self):
        if self.name == "torch":
            return self.fw.cuda.is_available()
        return self.fw.metal.is_available()


@pytest.fixture(params=["torch", "mlx"])
def be(request):
    return Backend(request.param)


def inputs(be, T, dtype="float32", seed=0):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, B, T, H, DK))
    k /= np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), 1e-6)
    v = rng.standard_normal((B, T, H, DV))
    g, beta = -rng.uniform(0, 1, (B, T, H)), rng.uniform(0, 1, (B, T, H))
    s0 = rng.standard_normal((B, H, DV, DK))
    return [be.array(x, dtype) for x in (q, k, v, g, beta)], be.array(s0, "float32")


@pytest.mark.parametrize("with_state", [True, False], ids=["state", "none"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("impl", IMPLS)
def test_empty_sequence(be, impl, dtype, with_state):
    (q, k, v, g, beta), s0 = inputs(be, 0, dtype)
    s0 = s0 if with_state else None
    o, s = be.ops.ssm_scan(q, k, v, g, beta, rule="delta", initial_state=s0, impl=impl)
    state_dtype = be.dtype("float64" if dtype == "float64" else "float32")
    assert tuple(o.shape) == (B, 0, H, DV) and o.dtype == v.dtype
    assert tuple(s.shape) == (B, H, DV, DK) and s.dtype == state_dtype
    want = be.numpy(s0) if with_state else np.zeros((B, H, DV, DK))
    np.testing.assert_array_equal(be.numpy(s), want)


@pytest.mark.parametrize("fn", ["ssm_scan_ref", "ssm_scan_chunk"])
@pytest.mark.parametrize("rule", ["delta", "hebbian"])
def test_empty_sequence_each_impl_function(be, fn, rule):
    """The public per-impl functions keep the same T = 0 contract as the dispatcher."""
    (q, k, v, g, beta), s0 = inputs(be, 0)
    o, s = getattr(be.ops, fn)(q, k, v, g, beta, rule=rule, initial_state=s0)
    assert tuple(o.shape) == (B, 0, H, DV)
    np.testing.assert_array_equal(be.numpy(s), be.numpy(s0))


def test_empty_sequence_state_is_not_an_alias(be):
    """Changing the returned state in place leaves the caller's initial state alone."""
    (q, k, v, g, beta), s0 = inputs(be, 0)
    before = be.numpy(s0)
    _, s = be.ops.ssm_scan(q, k, v, g, beta, rule="delta", initial_state=s0)
    s[...] = 0
    np.testing.assert_array_equal(be.numpy(s0), before)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_steps_in_a_stream_change_nothing(be, impl):
    """Streaming with empty calls in between gives the one-call numbers exactly."""
    xs, s0 = inputs(be, 7)
    o_full, s_full = be.ops.ssm_scan(*xs, rule="delta", initial_state=s0, impl=impl)
    state, outs = s0, []
    for lo, hi in [(0, 0), (0, 7), (7, 7)]:
        o, state = be.ops.ssm_scan(*(x[:, lo:hi] for x in xs), rule="delta", initial_state=state, impl=impl)
        outs.append(be.numpy(o))
    np.testing.assert_array_equal(np.concatenate(outs, axis=1), be.numpy(o_full))
    np.testing.assert_array_equal(be.numpy(state), be.numpy(s_full))


def test_empty_sequence_still_validates(be):
    (q, k, v, g, beta), s0 = inputs(be, 0)
    with pytest.raises(ValueError, match="'mamba'"):
        be.ops.ssm_scan(q, k, v, g, beta, rule="mamba")
    with pytest.raises(ValueError, match="chunk_size"):
        be.ops.ssm_scan(q, k, v, g, beta, rule="delta", chunk_size=0)
    with pytest.raises(ValueError, match="initial_state must be"):
        be.ops.ssm_scan(q, k, v, g, beta, rule="delta", initial_state=s0[:1])


def test_empty_sequence_kernel_unavailable_raises(be):
    """impl="kernel" checks its hardware first, whatever T is."""
    if be.kernel_available():
        pytest.skip(f"the {be.name} kernel can run here")
    (q, k, v, g, beta), _ = inputs(be, 0)
    with pytest.raises(RuntimeError, match="impl='kernel'"):
        be.ops.ssm_scan(q, k, v, g, beta, rule="delta", impl="kernel")


BAD_ARGUMENTS = {  # name -> change to the keyword arguments of ssm_scan
    "rule": lambda a: dict(rule="mamba"),
    "impl": lambda a: dict(impl="fast"),
    "chunk_size": lambda a: dict(chunk_size=0),
    "q_ndim": lambda a: dict(q=a["q"][0]),
    "k_shape": lambda a: dict(k=a["k"][..., :4]),
    "v_shape": lambda a: dict(v=a["v"][:, :4]),
    "g_shape": lambda a: dict(g=a["g"][..., None]),
    "beta_shape": lambda a: dict(beta=a["beta"][:, :4]),
    "state_shape": lambda a: dict(initial_state=a["initial_state"][:1]),
}


def bad_call_message(be, name):
    (q, k, v, g, beta), s0 = inputs(be, 5)
    args = dict(q=q, k=k, v=v, g=g, beta=beta, rule="delta", initial_state=s0, impl="chunk", chunk_size=4)
    args.update(BAD_ARGUMENTS[name](args))
    with pytest.raises(ValueError) as info:
        be.ops.ssm_scan(**args)
    return str(info.value)


@pytest.mark.parametrize("name", list(BAD_ARGUMENTS))
def test_bad_arguments_same_message_in_both_backends(name):
    pytest.importorskip("mlx.core")
    torch_message = bad_call_message(Backend("torch"), name)
    mlx_message = bad_call_message(Backend("mlx"), name)
    assert torch_message == mlx_message
