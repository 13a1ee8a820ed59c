"""Shared test helpers: `assert_close` reports max absolute and relative error by name."""

import numpy as np
import pytest


def to_numpy(x):
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):  # torch (bf16 has no numpy dtype: widen first)
        x = x.detach().cpu()
        return (x.double() if x.is_floating_point() else x).numpy()
    if type(x).__module__.startswith("mlx"):
        import mlx.core as mx
        return np.array(x.astype(mx.float32) if x.dtype in (mx.bfloat16, mx.float16) else x)
    return np.asarray(x)


def assert_close(name, ref, out, *, atol=0.0, rtol=1e-5):
    """Fail unless max|out-ref| <= atol + rtol * max|ref|; the message carries both errors."""
    ref, out = to_numpy(ref).astype(np.float64), to_numpy(out).astype(np.float64)
    assert ref.shape == out.shape, f"{name}: shape {out.shape} != reference {ref.shape}"
    err = float(np.max(np.abs(ref - out))) if ref.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    assert np.isfinite(out).all(), f"{name}: non-finite values"
    assert err <= atol + rtol * scale, f"{name}: max abs err {err:.3e}, rel {err / max(scale, 1e-30):.3e} (scale {scale:.3e})"


@pytest.fixture
def close():
    return assert_close


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (bit-for-bit comparisons of runs; no OpenMP spinning)."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
