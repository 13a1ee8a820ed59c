"""sleep_torch.ops.ssm_scan: chunk vs ref (outputs, final state, gradients), errors, kernels."""
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sleep_torch.ops import ssm_scan

REPO = Path(__file__).resolve().parents[2]
# Relative tolerances of chunk vs ref. Measured over test_chunk_matches_ref* (outputs, states and
# gradients, all gate regimes): at most 2.4e-15 in float64 and 1.3e-6 in float32. float64 at 1e-12
# still catches a chunk form that computes anything (its decays, say) in float32 (error ~1e-7).
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
RULES = ["delta", "hebbian"]


def assert_close(name, ref, out, tol):
    """Relative error = max|out - ref| / max|ref| (floored at a tiny number)."""
    err = (out.double() - ref.double()).abs().max().item()
    rel = err / max(ref.double().abs().max().item(), 1e-30)
    assert rel <= tol, f"{name}: max abs err {err:.3e}, rel err {rel:.3e} > {tol:.0e}"


def l2_normalize(x):
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + 1e-6)  # as the mixer does (SPEC 2)


def make_inputs(B, T, H, Dk, Dv, dtype, gates="normal", seed=0):
    """q, k, v, g, beta, initial_state, all leaf tensors requiring grad."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=dtype)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    q, k = l2_normalize(randn(B, T, H, Dk)), l2_normalize(randn(B, T, H, Dk))
    v, s0 = randn(B, T, H, Dv), randn(B, H, Dv, Dk)
    if gates == "normal":  # a_t in (0.37, 1), beta in (0, 1)
        g, beta = -rand(B, T, H), torch.sigmoid(randn(B, T, H))
    elif gates == "open":  # keep everything, write fully
        g, beta = -1e-4 * rand(B, T, H), 1 - 1e-4 * rand(B, T, H)
    elif gates == "closed":  # forget everything, barely write
        g, beta = -20 - rand(B, T, H), 1e-4 * rand(B, T, H)
    else:  # "mixed": each step randomly open or closed
        pick = rand(B, T, H) < 0.5
        g = torch.where(pick, -30 * torch.ones_like(pick, dtype=dtype), -1e-4 * rand(B, T, H))
        beta = torch.where(rand(B, T, H) < 0.5, 1e-4 * rand(B, T, H), 1 - 1e-4 * rand(B, T, H))
    return [x.detach().requires_grad_() for x in (q, k, v, g, beta, s0)]


def run_with_grads(inputs, *, rule, impl, chunk_size=64, seed=1):
    """Forward, then backward of a random linear function of (o, state); returns o, state, grads."""
    q, k, v, g, beta, s0 = inputs
    o, state = ssm_scan(q, k, v, g, beta, rule=rule, initial_state=s0, impl=impl, chunk_size=chunk_size)
    gen = torch.Generator().manual_seed(seed)
    w_o = torch.randn(o.shape, generator=gen, dtype=o.dtype)
    w_s = torch.randn(state.shape, generator=gen, dtype=state.dtype)
    grads = torch.autograd.grad((o * w_o).sum() + (state * w_s).sum(), inputs)
    return o.detach(), state.detach(), grads


def check_chunk_vs_ref(B, T, H, Dk, Dv, dtype, rule, chunk_size, gates="normal"):
    inputs = make_inputs(B, T, H, Dk, Dv, dtype, gates)
    o_ref, s_ref, g_ref = run_with_grads(inputs, rule=rule, impl="ref")
    o, s, grads = run_with_grads(inputs, rule=rule, impl="chunk", chunk_size=chunk_size)
    assert o.shape == (B, T, H, Dv) and o.dtype == dtype
    assert s.shape == (B, H, Dv, Dk) and s.dtype == dtype  # float32 state, float64 for float64 inputs
    tol = TOL[dtype]
    assert_close("o", o_ref, o, tol)
    assert_close("state", s_ref, s, tol)
    for name, a, b in zip(["dq", "dk", "dv", "dg", "dbeta", "dinitial_state"], g_ref, grads):
        assert_close(name, a, b, tol)


DTYPES = [pytest.param(torch.float64, id="f64"), pytest.param(torch.float32, id="f32")]


@pytest.mark.parametrize("chunk_size", [16, 64], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("T", [1, 7, 64, 100], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", RULES)
def test_chunk_matches_ref(rule, dtype, T, chunk_size):
    check_chunk_vs_ref(2, T, 2, 16, 8, dtype, rule, chunk_size)


@pytest.mark.parametrize("H,Dk,Dv", [(1, 4, 4), (3, 32, 16), (2, 8, 24)], ids=lambda x: str(x))
@pytest.mark.parametrize("rule", RULES)
def test_chunk_matches_ref_shapes(rule, H, Dk, Dv):
    check_chunk_vs_ref(1, 100, H, Dk, Dv, torch.float32, rule, 16)


@pytest.mark.parametrize("gates", ["open", "closed", "mixed"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", RULES)
def test_chunk_matches_ref_extreme_gates(rule, dtype, gates):
    check_chunk_vs_ref(2, 100, 2, 16, 8, dtype, rule, 64, gates)


@pytest.mark.parametrize("rule", RULES)
def test_chunk_very_negative_gates_finite(rule):
    """g = -30 per step over a whole chunk: exp(gam_i - gam_j) above the diagonal would overflow.
    Finite, and equal to the step loop (measured: 3.3e-7 relative at most, float32)."""
    q, k, v, g, beta, s0 = make_inputs(1, 64, 1, 8, 8, torch.float32)
    g = torch.full_like(g, -30.0).requires_grad_()
    results = {}
    for impl in ("ref", "chunk"):
        o, s = ssm_scan(q, k, v, g, beta, rule=rule, initial_state=s0, impl=impl)
        grads = torch.autograd.grad(o.sum() + s.sum(), (q, k, v, g, beta, s0))
        assert all(torch.isfinite(x).all() for x in (o, s, *grads)), impl
        results[impl] = (o, s, *grads)
    for name, a, b in zip(["o", "state", "dq", "dk", "dv", "dg", "dbeta", "dinitial_state"], *results.values()):
        assert_close(name, a, b, TOL[torch.float32])


def naive_loop(q, k, v, g, beta, rule, s0):
    """The SPEC formulas written literally, one (b, h) and one step at a time, in float64."""
    B, T, H, Dk = q.shape
    o = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    S = s0.clone()
    for b in range(B):
        for h in range(H):
            for t in range(T):
                kt, vt, a, bt = k[b, t, h], v[b, t, h], g[b, t, h].exp(), beta[b, t, h]
                if rule == "delta":
                    S[b, h] = a * S[b, h] @ (torch.eye(Dk, dtype=torch.float64) - bt * torch.outer(kt, kt))
                else:
                    S[b, h] = a * S[b, h]
                S[b, h] = S[b, h] + bt * torch.outer(vt, kt)
                o[b, t, h] = S[b, h] @ q[b, t, h] * Dk**-0.5
    return o, S


@pytest.mark.parametrize("rule", RULES)
def test_ref_matches_naive_loop(rule):
    q, k, v, g, beta, s0 = (x.detach() for x in make_inputs(2, 9, 2, 6, 5, torch.float64))
    o_ref, s_ref = ssm_scan(q, k, v, g, beta, rule=rule, initial_state=s0, impl="ref")
    o, s = naive_loop(q, k, v, g, beta, rule, s0)
    assert_close("o", o, o_ref, 1e-12)
    assert_close("state", s, s_ref, 1e-12)


@pytest.mark.parametrize("impl", ["ref", "chunk"])
@pytest.mark.parametrize("rule", RULES)
def test_initial_state_none_is_zeros(rule, impl):
    q, k, v, g, beta, s0 = (x.detach() for x in make_inputs(2, 10, 2, 8, 4, torch.float32))
    o1, s1 = ssm_scan(q, k, v, g, beta, rule=rule, impl=impl, chunk_size=4)
    o2, s2 = ssm_scan(q, k, v, g, beta, rule=rule, impl=impl, chunk_size=4, initial_state=torch.zeros_like(s0))
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(s1, s2)


def test_dtypes_scale_and_auto():
    q, k, v, g, beta, s0 = (x.detach() for x in make_inputs(1, 20, 2, 8, 8, torch.float32))
    for impl in ("ref", "chunk"):  # o in v's dtype, state in float32
        o, s = ssm_scan(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, beta, rule="delta", impl=impl)
        assert o.dtype == torch.bfloat16 and s.dtype == torch.float32, impl
    # scale is applied to the output only, so o is linear in it
    o1, _ = ssm_scan(q, k, v, g, beta, rule="delta", scale=1.0, impl="ref")
    o2, _ = ssm_scan(q, k, v, g, beta, rule="delta", scale=0.5, impl="ref")
    torch.testing.assert_close(o2, 0.5 * o1)
    # on CPU "auto" is the chunk form for T > 1 and the step loop for T == 1 (bit for bit)
    oa, sa = ssm_scan(q, k, v, g, beta, rule="delta", initial_state=s0)
    oc, sc = ssm_scan(q, k, v, g, beta, rule="delta", initial_state=s0, impl="chunk")
    assert torch.equal(oa, oc) and torch.equal(sa, sc)
    one = (x[:, :1] for x in (q, k, v, g, beta))
    oa, sa = ssm_scan(*one, rule="delta", initial_state=s0)
    one = (x[:, :1] for x in (q, k, v, g, beta))
    orf, srf = ssm_scan(*one, rule="delta", initial_state=s0, impl="ref")
    assert torch.equal(oa, orf) and torch.equal(sa, srf)


def test_empty_sequence_returns_initial_state():
    q, k, v, g, beta, s0 = (x.detach() for x in make_inputs(2, 0, 2, 8, 4, torch.float32))
    o, s = ssm_scan(q, k, v, g, beta, rule="delta", initial_state=s0)
    assert o.shape == (2, 0, 2, 4)
    torch.testing.assert_close(s, s0)


BAD_ARGUMENTS = {  # name -> (argument overrides, part of the expected message)
    "impl": (lambda a: dict(impl="fast"), "'fast'"),
    "rule": (lambda a: dict(rule="mamba"), "'mamba'"),
    "q_ndim": (lambda a: dict(q=a["q"][0]), "q must be"),
    "k_shape": (lambda a: dict(k=a["k"][..., :4]), "k must"),
    "v_shape": (lambda a: dict(v=a["v"][:, :4]), "v must"),
    "g_shape": (lambda a: dict(g=a["g"][..., None]), "g must"),
    "beta_shape": (lambda a: dict(beta=a["beta"][:, :4]), "beta must"),
    "state_transposed": (lambda a: dict(initial_state=a["initial_state"].transpose(-1, -2)), "initial_state must"),
    "chunk_size": (lambda a: dict(chunk_size=0), "chunk_size"),
}


@pytest.mark.parametrize("name", list(BAD_ARGUMENTS))
def test_bad_arguments_raise_value_error(name):
    q, k, v, g, beta, s0 = (x.detach() for x in make_inputs(2, 5, 2, 8, 4, torch.float32))
    args = dict(q=q, k=k, v=v, g=g, beta=beta, rule="delta", initial_state=s0, impl="chunk", chunk_size=4)
    override, match = BAD_ARGUMENTS[name]
    args.update(override(args))
    with pytest.raises(ValueError, match=match):
        ssm_scan(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("g"), args.pop("beta"), **args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the kernel path would run")
def test_kernel_without_cuda_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, g, beta, _ = (x.detach() for x in make_inputs(1, 4, 1, 8, 8, torch.float32))
    with pytest.raises(RuntimeError, match="CUDA"):
        ssm_scan(q, k, v, g, beta, rule="delta", impl="kernel")


# Our Triton recurrent kernel, run by Triton's interpreter on CPU. TRITON_INTERPRET must be set
# before triton is imported, so the check runs in a fresh process.
INTERPRETED_KERNEL_CHECK = textwrap.dedent("""
    import torch
    from sleep_torch.ops import ssm_scan
    from tests.torch.test_ops import make_inputs

    failures = []
    for rule in ("delta", "hebbian"):
        for T in (1, 5):
            for H, Dk, Dv in ((2, 16, 8), (1, 12, 40)):  # Dk not a power of 2, Dv over 2 row blocks
                for with_state in (True, False):
                    q, k, v, g, beta, s0 = (x.detach() for x in make_inputs(2, T, H, Dk, Dv, torch.float32))
                    s0 = s0 if with_state else None
                    o_ref, s_ref = ssm_scan(q, k, v, g, beta, rule=rule, initial_state=s0, impl="ref")
                    o, s = ssm_scan(q, k, v, g, beta, rule=rule, initial_state=s0, impl="kernel")
                    assert o.dtype == v.dtype and s.dtype == torch.float32
                    for name, a, b in (("o", o_ref, o), ("state", s_ref, s)):
                        rel = ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()
                        if not rel <= 1e-4:
                            failures.append(f"{rule} T={T} {(H, Dk, Dv)} state={with_state} {name}: rel {rel:.2e}")
    print("\\n".join(failures) or "ok")
    raise SystemExit(1 if failures else 0)
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_own_triton_kernel_interpreted_matches_ref():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", INTERPRETED_KERNEL_CHECK], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


@pytest.mark.parametrize("rule", RULES)
def test_ref_matches_fla_naive(rule):
    """Cross-check against flash-linear-attention's own naive references (key-first state)."""
    if rule == "delta":
        naive = pytest.importorskip("fla.ops.gated_delta_rule.naive").naive_recurrent_gated_delta_rule
    else:
        naive = pytest.importorskip("fla.ops.simple_gla.naive").naive_recurrent_simple_gla
    q, k, v, g, beta, s0 = (x.detach() for x in make_inputs(2, 20, 2, 8, 6, torch.float32))
    o_ref, s_ref = ssm_scan(q, k, v, g, beta, rule=rule, initial_state=s0, impl="ref")
    h0 = s0.transpose(-1, -2).contiguous()  # (B, H, Dk, Dv)
    if rule == "delta":
        o, s = naive(q, k, v, beta, g, initial_state=h0, output_final_state=True)
    else:
        o, s = naive(q, k, v * beta[..., None], g, initial_state=h0, output_final_state=True)
    assert_close("o", o_ref, o, 1e-4)
    assert_close("state", s_ref, s.transpose(-1, -2), 1e-4)
