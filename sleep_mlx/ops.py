"""SSM scan for the SSM mixer (SPEC section 4), MLX backend; mirrors sleep_torch.ops.

Recurrence, per batch b and head h, state S_t of shape [Dv, Dk] ("value-first"):

    a_t = exp(g_t)                                          g_t <= 0 is the log forget gate
    delta:   S_t = a_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T
    hebbian: S_t = a_t S_{t-1} + beta_t v_t k_t^T
    o_t = scale * S_t q_t                                   scale defaults to Dk^-1/2

The op does not normalize q/k or apply gate nonlinearities (the mixer does).

Chunked form (impl="chunk"). Both rules can be written S_t = a_t S_{t-1} + w_t k_t^T with
    delta:   w_t = beta_t (v_t - a_t S_{t-1} k_t)           hebbian: w_t = beta_t v_t
Inside a chunk of C steps starting from state S_0, let G_t = g_1 + ... + g_t (log space) and
D[t, j] = exp(G_t - G_j) for j <= t (0 above the diagonal). Unrolling gives
    S_t = exp(G_t) S_0 + sum_{j<=t} D[t, j] w_j k_j^T
and, for the delta rule, a lower-triangular system for the rows w_t of W:
    (I + A) W = diag(beta) V - diag(beta exp(G)) K S_0^T, A[t,j] = beta_t (k_t . k_j) D[t,j], j < t
so W = U - Wk S_0^T with U = (I + A)^-1 diag(beta) V and Wk = (I + A)^-1 diag(beta exp(G)) K
(the WY / UT-transform form of Gated DeltaNet). Then, with P = scale * (Q K^T * D):
    O   = (scale * diag(exp(G)) Q - P Wk) S_0^T + P U
    S_C = S_0 (exp(G_C) I - Wk^T diag(exp(G_C - G)) K) + U^T diag(exp(G_C - G)) K
Everything except the last line is parallel over chunks; the last line is a linear recurrence
over chunks (one [Dv, Dk] x [Dk, Dk] matmul per chunk). Hebbian: U = diag(beta) V, Wk = 0.

Implementations (same signature, see `ssm_scan`):
    "ref"    step-by-step loop in float32 (the compute dtype): the ground truth; differentiable.
    "chunk"  the chunked form above in MLX ops; differentiable (mx.grad / mx.value_and_grad).
             The unit lower-triangular inverse uses mx.linalg.tri_inv (LAPACK, CPU stream) with a
             hand-written vjp, since MLX has no vjp for it.
    "kernel" a `mx.fast.metal_kernel` recurrent scan (Apple GPUs only). Its forward pass is the
             kernel; its backward pass recomputes through the chunk form (custom vjp).
    "auto"   "kernel" when Metal is available, Dk % 32 == 0, inputs are not float64 and
             T <= KERNEL_MAX_T (decode and short prefill); otherwise "ref" for T == 1 (a single
             decode step, ~5x cheaper than a one-step chunk on CPU) and "chunk" for T > 1.

Dtypes: computation runs in promote(float32, inputs): float32 for float32/bfloat16/float16
inputs, float64 when any input is float64 (CPU only, for tests; MLX's CPU exp is only
float32-accurate even on float64 arrays, so float64 results agree to ~1e-7, not 1e-15).
The output o has v's dtype; the returned state has the compute dtype (float32 in practice).
"""

import math
from functools import partial

import mlx.core as mx

RULES = ("delta", "hebbian")
IMPLS = ("auto", "ref", "chunk", "kernel")
COMPILE = True  # mx.compile the chunk core (retraced per shape); False to debug
KERNEL_MAX_T = 64  # "auto" uses the recurrent Metal kernel up to this many steps per call


# --------------------------------------------------------------------------------------------
# Reference: step-by-step loop


def ssm_scan_ref(q, k, v, g, beta, *, rule, scale=None, initial_state=None):
    """Step-by-step loop, the ground truth: (o [B,T,H,Dv] in v's dtype, state [B,H,Dv,Dk])."""
    dt = _compute_dtype(q, k, v, g, beta)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    scale = Dk**-0.5 if scale is None else scale
    out_dtype = v.dtype
    steps = zip(*(_unstack(x.astype(dt), axis=1) for x in (q, k, v, g, beta)))
    S = _initial_state(initial_state, B, H, Dv, Dk, dt)  # (B, H, Dv, Dk)
    outs = []
    for q_t, k_t, v_t, g_t, beta_t in steps:  # (B, H, Dk), (B, H, Dk), (B, H, Dv), (B, H), (B, H)
        a_t, b_t = mx.exp(g_t)[..., None], beta_t[..., None]  # (B, H, 1)
        # a S (I - b k k^T) + b v k^T = a S + w k^T, w = b (v - a S k): fewer [Dv, Dk] temporaries
        w = b_t * v_t  # (B, H, Dv)
        if rule == "delta":
            w = w - (b_t * a_t) * (S @ k_t[..., None])[..., 0]
        S = a_t[..., None] * S + w[..., :, None] * k_t[..., None, :]  # (B, H, Dv, Dk)
        outs.append((S @ q_t[..., None])[..., 0] * scale)  # (B, H, Dv)
    o = mx.stack(outs, axis=1)  # (B, T, H, Dv)
    return o.astype(out_dtype), S


def _unstack(x, axis, fanout=64):
    """x split into its slices along `axis`, with a backward pass that stacks the cotangents.

    Plain indexing x[:, t] inside a loop has a vjp that writes into a zero array of x's full
    size per step: O(T^2) time and memory in the backward pass (12 GB at T = 2048 here).
    One custom op with T outputs is O(T^2) too (each output lists its siblings), so the split
    is a tree of ops with at most `fanout` outputs each."""
    x = mx.moveaxis(x, axis, 0)
    T = x.shape[0]
    if T <= fanout:
        return list(_unstack0(x))
    m = -(-T // fanout)  # slices per group
    x = mx.pad(x, [(0, fanout * m - T)] + [(0, 0)] * (x.ndim - 1))
    groups = _unstack0(x.reshape(fanout, m, *x.shape[1:]))  # fanout x (m, ...)
    return [s for group in groups for s in _unstack(group, 0, fanout)][:T]


@mx.custom_function
def _unstack0(x):
    return tuple(x[i] for i in range(x.shape[0]))


@_unstack0.vjp
def _unstack0_vjp(primals, cotangents, outputs):
    return (mx.stack(cotangents, axis=0),)


# --------------------------------------------------------------------------------------------
# Chunked parallel form


@mx.custom_function
def _unit_lower_inverse(N):
    """(I + N)^-1 for strictly lower-triangular N [..., C, C]."""
    eye = mx.eye(N.shape[-1], dtype=N.dtype)
    # LAPACK trtri (CPU only in MLX); the system is small, the sync cost is accepted on Metal.
    return mx.linalg.tri_inv(N + eye, upper=False, stream=mx.cpu)


@_unit_lower_inverse.vjp
def _unit_lower_inverse_vjp(primals, cotangent, output):
    # X = (I + N)^-1  =>  dX = -X dN X  =>  dN = -X^T dX X^T, kept on the lower triangle
    # (tri_inv reads only that part of its input).
    Xt = mx.swapaxes(output, -1, -2)
    return (mx.tril(-(Xt @ cotangent @ Xt)),)


def _chunk_prepare(q, k, v, g, beta, *, rule, scale):
    """Per-chunk quantities, parallel over chunks; inputs in (B, H, N, C, D) layout.

    Returns Qe, PU (o = Qe S_0^T + PU), Z and M (S_C = S_0 M + Z; hebbian: M is the decay)."""
    C, Dv = q.shape[-2], v.shape[-1]
    G = mx.cumsum(g, axis=-1)  # (B, H, N, C) cumulative log gate inside each chunk
    causal = mx.tril(mx.ones((C, C), dtype=mx.bool_))
    strict = mx.tril(mx.ones((C, C), dtype=mx.bool_), -1)
    # log D[t, j] = G_t - G_j = sum of g_s over j < s <= t, summed directly rather than as a
    # difference: with g = -20 steps G reaches -1000s and G_t - G_j would lose ~1e-4 absolute.
    # Every entry is <= 0 (no overflow); the upper triangle is masked to -inf before exp.
    logD = mx.cumsum(mx.where(strict, g[..., :, None], 0), axis=-2)  # (B, H, N, C, C)
    D = mx.exp(mx.where(causal, logD, -math.inf))  # (B, H, N, C, C)
    decay_end = mx.exp(G[..., -1:])[..., None]  # (B, H, N, 1, 1)
    k_end = k * D[..., -1, :, None]  # (B, H, N, C, Dk): k_j decayed to the chunk end
    Qs = q * (mx.exp(G)[..., None] * scale)  # (B, H, N, C, Dk)
    vb = v * beta[..., None]  # (B, H, N, C, Dv)
    kT = mx.swapaxes(k, -1, -2)
    if rule == "hebbian":
        P = (q @ kT) * (D * scale)  # (B, H, N, C, C)
        Z = mx.swapaxes(vb, -1, -2) @ k_end  # (B, H, N, Dv, Dk): writes decayed to the chunk end
        return Qs, P @ vb, Z, decay_end
    kb = k * beta[..., None]  # (B, H, N, C, Dk)
    QK = mx.concatenate([q, kb], axis=-2) @ kT  # (B, H, N, 2C, C): q K^T and diag(beta) K K^T
    P = QK[..., :C, :] * (D * scale)  # (B, H, N, C, C)
    A = mx.where(strict, QK[..., C:, :] * D, 0)  # (B, H, N, C, C)
    # One solve for both right-hand sides: [U, Wk] = (I + A)^-1 [diag(beta) V, diag(beta e^G) K]
    UW = _unit_lower_inverse(A) @ mx.concatenate([vb, kb * mx.exp(G)[..., None]], axis=-1)
    PUW = P @ UW  # (B, H, N, C, Dv + Dk): P U and P Wk
    UWk = mx.swapaxes(UW, -1, -2) @ k_end  # (B, H, N, Dv + Dk, Dk): U^T K_end and Wk^T K_end
    M = decay_end * mx.eye(k.shape[-1], dtype=k.dtype) - UWk[..., Dv:, :]  # (B, H, N, Dk, Dk)
    return Qs - PUW[..., Dv:], PUW[..., :Dv], UWk[..., :Dv, :], M


def ssm_scan_chunk(q, k, v, g, beta, *, rule, scale=None, initial_state=None, chunk_size=64):
    """Chunked parallel form (see module docstring); differentiable. Any T (the tail is padded)."""
    dt = _compute_dtype(q, k, v, g, beta)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    scale = Dk**-0.5 if scale is None else scale
    C = min(chunk_size, T)
    N = -(-T // C)
    pad = N * C - T
    S0 = _initial_state(initial_state, B, H, Dv, Dk, dt)

    def blocks(x):  # (B, T, H, ...) -> (B, H, N, C, ...); padded steps: g = beta = k = 0
        x = x.astype(dt)
        if pad:
            x = mx.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(B, N, C, H, *x.shape[3:])
        return mx.moveaxis(x, 3, 1)

    core = _compiled_core(rule, scale) if COMPILE else partial(_chunk_core, rule=rule, scale=scale)
    o, S = core(*(blocks(x) for x in (q, k, v, g, beta)), S0)  # (B, H, N, C, Dv), (B, H, Dv, Dk)
    o = mx.moveaxis(o, 1, 3).reshape(B, N * C, H, Dv)[:, :T]  # (B, T, H, Dv)
    return o.astype(v.dtype), S


def _chunk_core(q, k, v, g, beta, S0, *, rule, scale):
    """Chunked scan on (B, H, N, C, D) blocks: (o blocks, final state)."""
    Qe, PU, Z, M = _chunk_prepare(q, k, v, g, beta, rule=rule, scale=scale)
    starts, S = _chunk_recurrence(S0, Z, M, rule == "delta")
    return Qe @ mx.swapaxes(starts, -1, -2) + PU, S  # (B, H, N, C, Dv)


_compiled_cores = {}


def _compiled_core(rule, scale):
    """mx.compile'd `_chunk_core`, one per (rule, scale); MLX retraces it for new shapes."""
    key = (rule, float(scale))
    if key not in _compiled_cores:
        _compiled_cores[key] = mx.compile(partial(_chunk_core, rule=rule, scale=float(scale)))
    return _compiled_cores[key]


def _chunk_recurrence(S, Z, M, matmul):
    """S_{n+1} = S_n @ M_n + Z_n (delta) or M_n * S_n + Z_n (hebbian, M = decay).

    Returns the state at every chunk start, (B, H, N, Dv, Dk), and the final state."""
    starts = []
    for M_n, Z_n in zip(_unstack(M, axis=2), _unstack(Z, axis=2)):
        starts.append(S)
        S = (S @ M_n if matmul else M_n * S) + Z_n
    return mx.stack(starts, axis=2), S


# --------------------------------------------------------------------------------------------
# Metal kernel: recurrent scan, one SIMD group (32 threads) per state row


# Grid (32, Dv, B*H): thread `lane` of the SIMD group for (row, b*H + h) keeps the columns
# lane, lane + 32, ... of state row `row` in registers (Dk / 32 floats). Per step it reads k_t
# and q_t (its columns), v_t[row], g_t and beta_t, and uses
#     S_t[row] = a_t S_{t-1}[row] + w k_t^T,  w = beta_t (v_t[row] - a_t S_{t-1}[row] . k_t)  (delta)
#                                             w = beta_t v_t[row]                          (hebbian)
# o_t[row] = scale * S_t[row] . q_t. Dot products are simd_sum reductions over the 32 lanes.
# Written and reviewed without Apple hardware: tests/mlx/test_ops.py checks it against the ref
# wherever mx.metal.is_available().
_KERNEL_SOURCE = """
    constexpr int n_per = Dk / 32;
    const uint lane = thread_position_in_grid.x;
    const uint row = thread_position_in_grid.y;
    const uint bh = thread_position_in_grid.z;
    const int T = q_shape[1];
    const int H = q_shape[2];
    const size_t b = bh / H;
    const size_t h = bh % H;

    float s[n_per];
    const device float* s_in = state_in + (size_t(bh) * Dv + row) * Dk;
    for (int i = 0; i < n_per; ++i) s[i] = s_in[lane + 32 * i];
    const float sc = scale[0];

    for (int t = 0; t < T; ++t) {
        const size_t bth = (b * T + t) * H + h;  // index into [B, T, H]
        auto k_t = k + bth * Dk;  // this step's key and query, [Dk] each
        auto q_t = q + bth * Dk;
        const float a = metal::exp(static_cast<float>(g[bth]));
        const float bt = static_cast<float>(beta[bth]);
        const float v_t = static_cast<float>(v[bth * Dv + row]);
        float kk[n_per];
        for (int i = 0; i < n_per; ++i) kk[i] = static_cast<float>(k_t[lane + 32 * i]);
        float w = bt * v_t;
        if (RULE == 0) {  // delta: subtract the decayed prediction S_{t-1}[row] . k_t
            float sk = 0.0f;
            for (int i = 0; i < n_per; ++i) sk += s[i] * kk[i];
            w -= bt * a * simd_sum(sk);
        }
        float out = 0.0f;
        for (int i = 0; i < n_per; ++i) {
            s[i] = a * s[i] + w * kk[i];
            out += s[i] * static_cast<float>(q_t[lane + 32 * i]);
        }
        out = simd_sum(out);
        if (lane == 0) o[bth * Dv + row] = static_cast<OutT>(out * sc);
    }

    device float* s_out = state_out + (size_t(bh) * Dv + row) * Dk;
    for (int i = 0; i < n_per; ++i) s_out[lane + 32 * i] = s[i];
"""

_kernel_cache = {}  # built once, on first use (creating it needs no GPU, running it does)


def _metal_kernel():
    if "scan" not in _kernel_cache:
        _kernel_cache["scan"] = mx.fast.metal_kernel(
            name="lm_sleep_ssm_scan",
            input_names=["q", "k", "v", "g", "beta", "state_in", "scale"],
            output_names=["o", "state_out"],
            source=_KERNEL_SOURCE,
        )
    return _kernel_cache["scan"]


def _kernel_forward(q, k, v, g, beta, S0, *, rule, scale):
    """Run the Metal kernel: (o [B,T,H,Dv] in v's dtype, state [B,H,Dv,Dk] float32)."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    ty = 4 if Dv % 4 == 0 else 1  # SIMD groups (state rows) per threadgroup
    o, S = _metal_kernel()(
        inputs=[q, k, v, g, beta, S0.astype(mx.float32), mx.array([scale], dtype=mx.float32)],
        template=[("Dk", Dk), ("Dv", Dv), ("RULE", RULES.index(rule)), ("OutT", v.dtype)],
        grid=(32, Dv, B * H),
        threadgroup=(32, ty, 1),
        output_shapes=[(B, T, H, Dv), (B, H, Dv, Dk)],
        output_dtypes=[v.dtype, mx.float32],
    )
    return o, S


def ssm_scan_kernel(q, k, v, g, beta, *, rule, scale=None, initial_state=None):
    """Metal recurrent scan (Apple GPUs). Backward recomputes through the chunk form."""
    if not mx.metal.is_available():
        raise RuntimeError(
            "impl='kernel' runs an mx.fast.metal_kernel and needs an Apple-Silicon GPU, but Metal "
            "is not available here (mx.metal.is_available() is False); use impl='chunk' or 'auto'"
        )
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    if Dk % 32:
        raise ValueError(f"impl='kernel' needs Dk divisible by 32, got Dk={Dk}")
    if _compute_dtype(q, k, v, g, beta) != mx.float32:
        raise ValueError("impl='kernel' computes in float32 and does not take float64 inputs")
    scale = Dk**-0.5 if scale is None else scale
    S0 = _initial_state(initial_state, B, H, Dv, Dk, mx.float32)
    return _differentiable_kernel(q, k, v, g, beta, S0, rule=rule, scale=scale)


def _differentiable_kernel(q, k, v, g, beta, S0, *, rule, scale, forward=None):
    """Kernel forward with a vjp that differentiates the chunk form at the same inputs."""
    forward = forward or _kernel_forward

    @mx.custom_function
    def scan(q, k, v, g, beta, S0):
        return forward(q, k, v, g, beta, S0, rule=rule, scale=scale)

    @scan.vjp
    def scan_vjp(primals, cotangents, outputs):
        def chunk(q, k, v, g, beta, S0):
            return ssm_scan_chunk(q, k, v, g, beta, rule=rule, scale=scale, initial_state=S0)

        _, grads = mx.vjp(chunk, list(primals), list(cotangents))
        return tuple(grads)

    return scan(q, k, v, g, beta, S0)


# --------------------------------------------------------------------------------------------
# Dispatcher


def ssm_scan(q, k, v, g, beta, *, rule, scale=None, initial_state=None, impl="auto", chunk_size=64):
    """Gated delta / hebbian scan.

    q, k: [B,T,H,Dk]; v: [B,T,H,Dv]; g (log forget gate, <= 0), beta (in (0, 1)): [B,T,H];
    initial_state: [B,H,Dv,Dk] or None (zeros). Returns (o [B,T,H,Dv] in v's dtype,
    state [B,H,Dv,Dk] float32 (float64 for float64 inputs)).
    impl: "auto" | "ref" | "chunk" | "kernel" (see the module docstring).
    """
    _check(q, k, v, g, beta, initial_state, rule, impl, chunk_size)
    T, Dk = q.shape[1], q.shape[3]
    if impl == "auto":
        impl = "chunk"
        if mx.metal.is_available() and Dk % 32 == 0 and T <= KERNEL_MAX_T:
            impl = "kernel" if _compute_dtype(q, k, v, g, beta) == mx.float32 else impl
        elif T == 1:
            impl = "ref"  # one decode step: the recurrence itself is the cheapest form
    args = dict(rule=rule, scale=scale, initial_state=initial_state)
    if impl == "ref":
        return ssm_scan_ref(q, k, v, g, beta, **args)
    if impl == "kernel":
        return ssm_scan_kernel(q, k, v, g, beta, **args)
    return ssm_scan_chunk(q, k, v, g, beta, chunk_size=chunk_size, **args)


def _check(q, k, v, g, beta, initial_state, rule, impl, chunk_size):
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if q.ndim != 4:
        raise ValueError(f"q must be [B,T,H,Dk], got shape {tuple(q.shape)}")
    B, T, H, Dk = q.shape
    if T < 1:
        raise ValueError(f"T must be >= 1, got q shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k shape {tuple(k.shape)} must equal q shape {tuple(q.shape)}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B,T,H,Dv] = [{B},{T},{H},Dv], got shape {tuple(v.shape)}")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != q.shape[:3]:
            raise ValueError(f"{name} must be [B,T,H] = {[B, T, H]}, got shape {tuple(x.shape)}")
    want = (B, H, v.shape[3], Dk)
    if initial_state is not None and tuple(initial_state.shape) != want:
        raise ValueError(
            f"initial_state must be [B,H,Dv,Dk] = {list(want)}, "
            f"got shape {tuple(initial_state.shape)}"
        )
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if not mx.issubdtype(x.dtype, mx.floating):
            raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")


def _compute_dtype(*xs):
    return mx.float64 if any(x.dtype == mx.float64 for x in xs) else mx.float32


def _initial_state(initial_state, B, H, Dv, Dk, dt):
    if initial_state is None:
        return mx.zeros((B, H, Dv, Dk), dtype=dt)
    return initial_state.astype(dt)
