r"""SSM scan for the SSM mixer (SPEC section 4): the gated delta / gated Hebbian recurrence, three ways,
one dispatcher. MLX backend; mirrors sleep_torch.ops: same functions, arguments and symbols.

Per batch element and head, with a value-first state S_t in R^{Dv x Dk}, a_t = exp(g_t), g_t <= 0:

    delta:    S_t = a_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T
    hebbian:  S_t = a_t S_{t-1} + beta_t v_t k_t^T
    o_t = scale * S_t q_t,  scale = Dk^-1/2 unless given

The op does not normalize q/k or apply gate nonlinearities (the mixer does).

Chunked form. Both rules read S_t = a_t S_{t-1} + d_t k_t^T, with d_t = beta_t v_t (hebbian) or
d_t = beta_t (v_t - a_t S_{t-1} k_t) (delta). Inside a chunk of C steps starting from state S_0, let
G_i = g_1 + ... + g_i (log decay from the chunk start to step i) and decay[i, j] = e^{G_i - G_j} for
j <= i (0 above the diagonal). With D the matrix of rows d_j, unrolling gives

    S_i = e^{G_i} S_0 + sum_{j<=i} decay[i, j] d_j k_j^T
    o_i = scale * (e^{G_i} S_0 q_i + sum_{j<=i} decay[i, j] (q_i . k_j) d_j)

For delta, D solves a unit lower-triangular system (the WY / UT form of Gated DeltaNet):

    (I + A) D = diag(beta) V - diag(beta e^G) K S_0^T,   A[i, j] = beta_i (k_i . k_j) decay[i, j], j < i
    => D = U - W S_0^T,   U = (I + A)^-1 diag(beta) V,   W = (I + A)^-1 diag(beta e^G) K

(hebbian: D = U = diag(beta) V, W = 0). U and W depend on the chunk alone, so they are computed for
all chunks at once; only passing the state from chunk to chunk is sequential:

    S_C = e^{G_C} S_0 + D^T K_end,   K_end = diag(decay[C, :]) K  (the keys decayed to the chunk end)

MLX substitutes D = U - W S_0^T once, so that all but a one-matmul-per-chunk recurrence is parallel
and inside one mx.compile'd function. With P = scale (Q K^T * decay):

    O = Qe S_0^T + P U,   Qe = scale diag(e^G) Q - P W
    S_C = S_0 M + Z,      M = e^{G_C} I - W^T K_end,   Z = U^T K_end

(hebbian: W = 0, and M is the scalar e^{G_C}). The unit lower-triangular inverse uses
mx.linalg.tri_inv (LAPACK, CPU stream) with a hand-written vjp, since MLX has no vjp for it.

impl: "ref" (step loop in float32: the ground truth; differentiable), "chunk" (the chunked form in
plain MLX ops; differentiable), "kernel" (the GPU path, Apple GPUs: an mx.fast.metal_kernel recurrent
scan for calls of up to RECURRENT_MAX_T steps, whose backward pass recomputes through the chunked
form, and the chunked form for longer calls), "auto" (kernel where available, with Dk % 32 == 0;
otherwise, for T == 1 (a decode step, where the recurrence itself is cheapest), the ref loop's body
as one mx.compile'd step, and "chunk" for T > 1).
Any T >= 0: T = 0 returns o [B, 0, H, Dv] and the initial state (zeros when None) in the state's dtype.
Dtypes: computation runs in promote(float32, inputs); the state comes back in it, o in v's dtype.
float64 inputs run on the CPU only, for tests; MLX's CPU exp is only float32-accurate even on float64
arrays, so float64 results agree to ~1e-7, not 1e-15.
"""
import functools
import math

import mlx.core as mx

RULES = ("delta", "hebbian")
IMPLS = ("auto", "ref", "chunk", "kernel")
RECURRENT_MAX_T = 16  # "kernel" runs the recurrent kernel up to this many steps per call (see docs/DESIGN.md)
COMPILE = True  # mx.compile the chunk core (retraced per shape); False to debug


# ----------------------------------------------------------------------------- ref


def ssm_scan_ref(q, k, v, g, beta, *, rule, scale=None, initial_state=None):
    """Step-by-step loop in float32 (float64 for float64 inputs): the ground truth."""
    (B, T, H, Dk, Dv), dt = _check(q, k, v, g, beta, rule, initial_state)
    if T == 0:
        return _empty_scan(q, v, initial_state, dt)
    scale = Dk**-0.5 if scale is None else scale
    out_dtype = v.dtype
    steps = zip(*(_unstack(x.astype(dt), axis=1) for x in (q, k, v, g, beta)))
    S = _initial_state(initial_state, q, v, dt)  # (B, H, Dv, Dk)
    outs = []
    for q_t, k_t, v_t, g_t, b_t in steps:  # (B, H, Dk), (B, H, Dk), (B, H, Dv), (B, H), (B, H)
        a_t, b_t = mx.exp(g_t)[..., None], b_t[..., None]  # (B, H, 1)
        # a S (I - b k k^T) + b v k^T = a S + d k^T, d = b (v - a S k): fewer [Dv, Dk] temporaries
        d_t = b_t * v_t  # (B, H, Dv)
        if rule == "delta":
            d_t = d_t - (b_t * a_t) * (S @ k_t[..., None])[..., 0]
        S = a_t[..., None] * S + d_t[..., :, None] * k_t[..., None, :]  # (B, H, Dv, Dk)
        outs.append((S @ q_t[..., None])[..., 0] * scale)  # (B, H, Dv)
    return mx.stack(outs, axis=1).astype(out_dtype), S  # (B, T, H, Dv), (B, H, Dv, Dk)


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


# ----------------------------------------------------------------------------- step (T == 1)


def _step(q, k, v, g, beta, S, *, rule, scale):
    """One step of the ref loop: q, k [B, 1, H, Dk], v [B, 1, H, Dv], g, beta [B, 1, H], S float32
    -> (o [B, 1, H, Dv], S). The decode path of "auto" for T == 1 on the CPU, mx.compile'd
    (`_compiled_step`): one fused graph instead of the loop's unstack/stack and a dozen separately
    scheduled ops."""
    q, k, v, g, beta = q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0]  # (B, H, D), (B, H)
    a_t, b_t = mx.exp(g)[..., None], beta[..., None]  # (B, H, 1)
    d_t = b_t * v  # (B, H, Dv)
    if rule == "delta":
        d_t = d_t - (b_t * a_t) * (S * k[..., None, :]).sum(-1)  # S k as a reduction: no tiny matmuls
    S = a_t[..., None] * S + d_t[..., :, None] * k[..., None, :]  # (B, H, Dv, Dk)
    return ((S * q[..., None, :]).sum(-1) * scale)[:, None], S


@functools.lru_cache(maxsize=None)
def _compiled_step(rule, scale):
    """mx.compile'd `_step`, one per (rule, scale)."""
    return mx.compile(functools.partial(_step, rule=rule, scale=scale))


def _scan_step(q, k, v, g, beta, initial_state, *, rule, scale):
    """ssm_scan for T == 1 with float32 inputs (already checked): the compiled step."""
    S = _initial_state(initial_state, q, v, mx.float32) if initial_state is None or \
        initial_state.dtype != mx.float32 else initial_state
    return _compiled_step(rule, float(q.shape[-1]**-0.5 if scale is None else scale))(q, k, v, g, beta, S)


# ----------------------------------------------------------------------------- chunk


def ssm_scan_chunk(q, k, v, g, beta, *, rule, scale=None, initial_state=None, chunk_size=64):
    """Chunked parallel form (module docstring), differentiable, any T."""
    (B, T, H, Dk, Dv), dt = _check(q, k, v, g, beta, rule, initial_state)
    _check_chunk_size(chunk_size)
    if T == 0:
        return _empty_scan(q, v, initial_state, dt)
    scale = Dk**-0.5 if scale is None else scale
    C = min(chunk_size, T)  # a short sequence is one chunk, unpadded
    S0 = _initial_state(initial_state, q, v, dt)  # (B, H, Dv, Dk)
    # Padded steps have g = 0, beta = 0, k = 0: a = 1 and no write, so they leave the state alone.
    core = _compiled_core(rule, float(scale)) if COMPILE else functools.partial(_chunk_core, rule=rule, scale=scale)
    o, S = core(*(_to_chunks(x.astype(dt), C) for x in (q, k, v, g, beta)), S0)
    N = o.shape[2]
    o = mx.moveaxis(o, 1, 3).reshape(B, N * C, H, Dv)[:, :T]  # (B, T, H, Dv)
    return o.astype(v.dtype), S


def _to_chunks(x, C):
    """(B, T, H, ...) -> (B, H, N, C, ...), zero-padding T up to N*C."""
    pad = -x.shape[1] % C
    if pad:
        x = mx.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(x.shape[0], -1, C, *x.shape[2:])  # (B, N, C, H, ...)
    return mx.moveaxis(x, 3, 1)


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


def _chunk_core(q, k, v, g, beta, S0, *, rule, scale):
    """The chunked form on (B, H, N, C, ...) blocks from state S0: (o blocks (B, H, N, C, Dv), final state)."""
    C = q.shape[-2]
    Dv, Dk = v.shape[-1], k.shape[-1]
    G = mx.cumsum(g, axis=-1)  # (B, H, N, C) log decay from the chunk start up to step i (inclusive)
    causal = mx.tril(mx.ones((C, C), dtype=mx.bool_))
    strict = mx.tril(mx.ones((C, C), dtype=mx.bool_), -1)
    # seg[i, j] = g_{j+1} + ... + g_i = G_i - G_j, summed directly rather than subtracted: with
    # g = -20 per step G reaches -1000s and the difference would lose the digits that dg needs.
    seg = mx.cumsum(mx.where(strict, g[..., :, None], 0), axis=-2)  # (B, H, N, C, C)
    # Every entry is <= 0 (no overflow); the upper triangle is masked to -inf before exp.
    decay = mx.exp(mx.where(causal, seg, -math.inf))  # (B, H, N, C, C), zero above the diagonal
    a_chunk = mx.exp(G[..., -1:])[..., None]  # (B, H, N, 1, 1) e^{G_C}, the decay over a whole chunk
    k_end = k * decay[..., -1, :, None]  # (B, H, N, C, Dk) K_end: e^{G_C - G_j} k_j
    Qe = q * (mx.exp(G)[..., None] * scale)  # (B, H, N, C, Dk) scale diag(e^G) Q
    vb = v * beta[..., None]  # (B, H, N, C, Dv)
    kT = mx.swapaxes(k, -1, -2)
    if rule == "hebbian":  # U = diag(beta) V, W = 0
        P = (q @ kT) * (decay * scale)  # (B, H, N, C, C)
        PU, Z, M = P @ vb, mx.swapaxes(vb, -1, -2) @ k_end, a_chunk  # Z: (B, H, N, Dv, Dk)
    else:
        kb = k * beta[..., None]  # (B, H, N, C, Dk)
        QK = mx.concatenate([q, kb], axis=-2) @ kT  # (B, H, N, 2C, C): q K^T and diag(beta) K K^T
        P = QK[..., :C, :] * (decay * scale)  # (B, H, N, C, C)
        A = mx.where(strict, QK[..., C:, :] * decay, 0)  # (B, H, N, C, C)
        # One solve for both right-hand sides: [U, W] = (I + A)^-1 [diag(beta) V, diag(beta e^G) K]
        UW = _unit_lower_inverse(A) @ mx.concatenate([vb, kb * mx.exp(G)[..., None]], axis=-1)
        PUW = P @ UW  # (B, H, N, C, Dv + Dk): P U and P W
        UWk = mx.swapaxes(UW, -1, -2) @ k_end  # (B, H, N, Dv + Dk, Dk): U^T K_end and W^T K_end
        M = a_chunk * mx.eye(Dk, dtype=k.dtype) - UWk[..., Dv:, :]  # (B, H, N, Dk, Dk)
        Qe, PU, Z = Qe - PUW[..., Dv:], PUW[..., :Dv], UWk[..., :Dv, :]
    # The only sequential part: S_{n+1} = S_n M_n + Z_n (delta) or M_n S_n + Z_n (hebbian).
    S, starts = S0, []
    for M_n, Z_n in zip(_unstack(M, axis=2), _unstack(Z, axis=2)):
        starts.append(S)
        S = (S @ M_n if rule == "delta" else M_n * S) + Z_n
    starts = mx.stack(starts, axis=2)  # (B, H, N, Dv, Dk) state entering each chunk
    return Qe @ mx.swapaxes(starts, -1, -2) + PU, S


@functools.lru_cache(maxsize=None)
def _compiled_core(rule, scale):
    """mx.compile'd `_chunk_core`, one per (rule, scale); MLX retraces it for new shapes."""
    return mx.compile(functools.partial(_chunk_core, rule=rule, scale=scale))


# ----------------------------------------------------------------------------- kernel


# Grid (32, Dv, B*H): thread `lane` of the SIMD group for (row, b*H + h) keeps the columns
# lane, lane + 32, ... of state row `row` in registers (Dk / 32 floats). Per step it reads k_t
# and q_t (its columns), v_t[row], g_t and beta_t, and uses
#     S_t[row] = a_t S_{t-1}[row] + d k_t^T,  d = beta_t (v_t[row] - a_t S_{t-1}[row] . k_t)  (delta)
#                                             d = beta_t v_t[row]                          (hebbian)
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
        float d = bt * v_t;  // d_t[row], the write
        if (RULE == 0) {  // delta: subtract the decayed prediction S_{t-1}[row] . k_t
            float sk = 0.0f;
            for (int i = 0; i < n_per; ++i) sk += s[i] * kk[i];
            d -= bt * a * simd_sum(sk);
        }
        float out = 0.0f;
        for (int i = 0; i < n_per; ++i) {
            s[i] = a * s[i] + d * kk[i];
            out += s[i] * static_cast<float>(q_t[lane + 32 * i]);
        }
        out = simd_sum(out);
        if (lane == 0) o[bth * Dv + row] = static_cast<OutT>(out * sc);
    }

    device float* s_out = state_out + (size_t(bh) * Dv + row) * Dk;
    for (int i = 0; i < n_per; ++i) s_out[lane + 32 * i] = s[i];
"""


@functools.lru_cache(maxsize=None)
def _recurrent_scan_kernel():
    """Build the Metal recurrent kernel (creating it needs no GPU, running it does)."""
    return mx.fast.metal_kernel(
        name="lm_sleep_ssm_scan",
        input_names=["q", "k", "v", "g", "beta", "state_in", "scale"],
        output_names=["o", "state_out"],
        source=_KERNEL_SOURCE,
    )


def _recurrent_scan(q, k, v, g, beta, S0, *, rule, scale):
    """Run the Metal recurrent kernel from float32 state S0 (forward only): (o in v's dtype, state float32)."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    ty = 4 if Dv % 4 == 0 else 1  # SIMD groups (state rows) per threadgroup
    o, S = _recurrent_scan_kernel()(
        inputs=[q, k, v, g, beta, S0.astype(mx.float32), mx.array([scale], dtype=mx.float32)],
        template=[("Dk", Dk), ("Dv", Dv), ("RULE", RULES.index(rule)), ("OutT", v.dtype)],
        grid=(32, Dv, B * H),
        threadgroup=(32, ty, 1),
        output_shapes=[(B, T, H, Dv), (B, H, Dv, Dk)],
        output_dtypes=[v.dtype, mx.float32],
    )
    return o, S


def _differentiable_kernel(q, k, v, g, beta, S0, *, rule, scale, forward=None):
    """`forward` (default: the recurrent kernel) with a vjp through the chunked form at the same inputs."""
    forward = forward or _recurrent_scan

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


def _kernel_unavailable(x):
    """Why impl="kernel" cannot run here, or None when it can (x is unused: MLX arrays have no device)."""
    if not mx.metal.is_available():
        return ("impl='kernel' runs an mx.fast.metal_kernel and needs an Apple-Silicon GPU, but Metal is not "
                "available here (mx.metal.is_available() is False); use impl='chunk' or 'auto'")
    return None


def ssm_scan_kernel(q, k, v, g, beta, *, rule, scale=None, initial_state=None):
    """GPU path: the Metal recurrent kernel for short calls (decoding), the chunked form otherwise."""
    (B, T, H, Dk, Dv), dt = _check(q, k, v, g, beta, rule, initial_state)
    reason = _kernel_unavailable(q)
    if reason:
        raise RuntimeError(reason)
    if dt == mx.float64:
        raise ValueError("impl='kernel' computes in float32 and does not take float64 inputs; use impl='chunk'")
    if Dk % 32:
        raise ValueError(f"impl='kernel' needs Dk divisible by 32, got Dk={Dk}; use impl='chunk' or 'auto'")
    if T == 0:
        return _empty_scan(q, v, initial_state, dt)
    scale = Dk**-0.5 if scale is None else scale
    if T > RECURRENT_MAX_T:  # MLX has no chunked Metal kernel: the compiled chunked form is the long path
        return ssm_scan_chunk(q, k, v, g, beta, rule=rule, scale=scale, initial_state=initial_state)
    S0 = _initial_state(initial_state, q, v, mx.float32)
    return _differentiable_kernel(q, k, v, g, beta, S0, rule=rule, scale=scale)


# ----------------------------------------------------------------------------- dispatcher


def ssm_scan(q, k, v, g, beta, *, rule, scale=None, initial_state=None, impl="auto", chunk_size=64):
    """o [B, T, H, Dv] (v's dtype), final state [B, H, Dv, Dk] (float32, or float64 for float64 inputs).

    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; g (log forget gate, <= 0), beta: [B, T, H];
    initial_state: [B, H, Dv, Dk] or None (zeros). Any T >= 0 (T = 0: o is empty and the state is
    the initial one). chunk_size is used by impl="chunk" only. impl: see the module docstring.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    _check_chunk_size(chunk_size)
    (B, T, H, Dk, Dv), dt = _check(q, k, v, g, beta, rule, initial_state)
    if impl == "auto":
        use_kernel = Dk % 32 == 0 and dt == mx.float32 and _kernel_unavailable(q) is None
        if not use_kernel and T == 1 and all(x.dtype == mx.float32 for x in (q, k, v, g, beta)):
            return _scan_step(q, k, v, g, beta, initial_state, rule=rule, scale=scale)
        impl = "kernel" if use_kernel else ("ref" if T == 1 else "chunk")
    args = dict(rule=rule, scale=scale, initial_state=initial_state)
    if impl == "ref":
        return ssm_scan_ref(q, k, v, g, beta, **args)
    if impl == "kernel":
        return ssm_scan_kernel(q, k, v, g, beta, **args)
    return ssm_scan_chunk(q, k, v, g, beta, chunk_size=chunk_size, **args)


# ----------------------------------------------------------------------------- helpers


def _check(q, k, v, g, beta, rule, initial_state):
    """Validate the public arguments; return (B, T, H, Dk, Dv) and the compute dtype."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {RULES}")
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, H, Dk], got shape {tuple(q.shape)}")
    B, T, H, Dk = q.shape
    if tuple(k.shape) != (B, T, H, Dk):
        raise ValueError(f"k must have q's shape {(B, T, H, Dk)}, got k shape {tuple(k.shape)}")
    if v.ndim != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"v must be [B, T, H, Dv] with B, T, H = {(B, T, H)}, got shape {tuple(v.shape)}")
    Dv = v.shape[-1]
    for name, x in (("g", g), ("beta", beta)):
        if tuple(x.shape) != (B, T, H):
            raise ValueError(f"{name} must be [B, T, H] = {(B, T, H)}, got shape {tuple(x.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (B, H, Dv, Dk):
        raise ValueError(f"initial_state must be [B, H, Dv, Dk] = {(B, H, Dv, Dk)}, "
                         f"got shape {tuple(initial_state.shape)}")
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if not mx.issubdtype(x.dtype, mx.floating):
            raise ValueError(f"{name} must have a floating-point dtype, got {x.dtype}")
    return (B, T, H, Dk, Dv), _compute_dtype(q, k, v, g, beta)


def _check_chunk_size(chunk_size):
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _compute_dtype(*xs):
    """promote(float32, dtypes of xs): float32, or float64 when an input is float64."""
    return mx.float64 if any(x.dtype == mx.float64 for x in xs) else mx.float32


def _initial_state(initial_state, q, v, dtype):
    """initial_state in dtype, or zeros [B, H, Dv, Dk] when it is None."""
    if initial_state is None:
        B, _, H, Dk = q.shape
        return mx.zeros((B, H, v.shape[-1], Dk), dtype=dtype)
    return initial_state.astype(dtype)


def _empty_scan(q, v, initial_state, dtype):
    """The T = 0 result: (o [B, 0, H, Dv] in v's dtype, the initial state in dtype)."""
    B, _, H, _ = q.shape
    return mx.zeros((B, 0, H, v.shape[-1]), dtype=v.dtype), _initial_state(initial_state, q, v, dtype)
