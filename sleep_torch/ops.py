r"""SSM scan for the SSM mixer (SPEC section 4): the gated delta / gated Hebbian recurrence, three ways,
one dispatcher. sleep_mlx.ops mirrors this file: same functions, arguments and symbols.

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

torch runs that hand-off chunk by chunk (D = U - W S_0^T, then S_C) and then computes every chunk's
o = scale (diag(e^G) Q S_0^T + (Q K^T * decay) D) at once.

impl: "ref" (step loop in float32: the ground truth; differentiable), "chunk" (the chunked form in
plain torch ops; differentiable), "kernel" (the GPU path, CUDA: our own Triton recurrent kernel for
no-grad calls of up to RECURRENT_MAX_T steps, such as decoding, and flash-linear-attention's chunk
kernels otherwise), "auto" (kernel where available; otherwise, for T == 1 (a decode step, where the
recurrence itself is cheapest), the ref loop's body once, and "chunk" for T > 1).
Any T >= 0: T = 0 returns o [B, 0, H, Dv] and the initial state (zeros when None) in the state's dtype.
Dtypes: computation runs in promote(float32, inputs); the state comes back in it, o in v's dtype.
"""
import functools
import math
import os

import torch
import torch.nn.functional as F

RULES = ("delta", "hebbian")
IMPLS = ("auto", "ref", "chunk", "kernel")
RECURRENT_MAX_T = 16  # "kernel" runs the recurrent kernel up to this many steps per call (see docs/DESIGN.md)


# ----------------------------------------------------------------------------- ref


def ssm_scan_ref(q, k, v, g, beta, *, rule, scale=None, initial_state=None):
    """Step-by-step loop in float32 (float64 for float64 inputs): the ground truth."""
    (B, T, H, Dk, Dv), dt = _check(q, k, v, g, beta, rule, initial_state)
    if T == 0:
        return _empty_scan(q, v, initial_state, dt)
    scale = Dk**-0.5 if scale is None else scale
    out_dtype = v.dtype
    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    S = _initial_state(initial_state, q, v, dt)  # (B, H, Dv, Dk)
    outs = []
    # unbind: per-step views whose backward is one stack (indexing x[:, t] would cost O(T^2)).
    for q_t, k_t, v_t, g_t, b_t in zip(*(x.unbind(1) for x in (q, k, v, g, beta))):  # (B, H, D), (B, H)
        S = S * g_t.exp()[..., None, None]
        if rule == "delta":  # a S (I - b k k^T) + b v k^T = a S + d k^T, d = b (v - a S k)
            v_t = v_t - (S @ k_t[..., None])[..., 0]
        d_t = b_t[..., None] * v_t  # (B, H, Dv)
        S = S + d_t[..., :, None] * k_t[..., None, :]
        outs.append((S @ q_t[..., None])[..., 0] * scale)  # (B, H, Dv)
    return torch.stack(outs, dim=1).to(out_dtype), S  # (B, T, H, Dv), (B, H, Dv, Dk)


# ----------------------------------------------------------------------------- step (T == 1)


def _step(q, k, v, g, beta, S, *, rule, scale):
    """One step of the ref loop: q, k [B, 1, H, Dk], v [B, 1, H, Dv], g, beta [B, 1, H], S float32
    -> (o [B, 1, H, Dv], S). The decode path of "auto" for T == 1 without a GPU kernel: the loop's
    body without its unbind/stack (same arithmetic, same order)."""
    q, k, v, g, beta = q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0]  # (B, H, D), (B, H)
    S = S * g.exp()[..., None, None]
    if rule == "delta":
        v = v - (S @ k[..., None])[..., 0]
    d = beta[..., None] * v  # (B, H, Dv)
    S = S + d[..., :, None] * k[..., None, :]
    return ((S @ q[..., None])[..., 0] * scale)[:, None], S


def _scan_step(q, k, v, g, beta, initial_state, *, rule, scale):
    """ssm_scan for T == 1 with float32 inputs (already checked): one `_step`."""
    S = _initial_state(initial_state, q, v, torch.float32)
    return _step(q, k, v, g, beta, S, rule=rule, scale=q.shape[-1]**-0.5 if scale is None else scale)


# ----------------------------------------------------------------------------- chunk


def ssm_scan_chunk(q, k, v, g, beta, *, rule, scale=None, initial_state=None, chunk_size=64):
    """Chunked parallel form (module docstring), differentiable by autograd, any T."""
    (B, T, H, Dk, Dv), dt = _check(q, k, v, g, beta, rule, initial_state)
    _check_chunk_size(chunk_size)
    if T == 0:
        return _empty_scan(q, v, initial_state, dt)
    scale = Dk**-0.5 if scale is None else scale
    C = min(chunk_size, T)  # a short sequence is one chunk, unpadded
    S0 = _initial_state(initial_state, q, v, dt)  # (B, H, Dv, Dk)
    # Padded steps have g = 0, beta = 0, k = 0: a = 1 and no write, so they leave the state alone.
    o, S = _chunk_core(*(_to_chunks(x.to(dt), C) for x in (q, k, v, g, beta)), S0, rule=rule, scale=scale)
    N = o.shape[2]
    o = o.reshape(B, H, N * C, Dv)[:, :, :T].transpose(1, 2)  # (B, T, H, Dv)
    return o.to(v.dtype), S


def _to_chunks(x, C):
    """(B, T, H, ...) -> (B, H, N, C, ...), zero-padding T up to N*C."""
    x = x.movedim(1, 2)  # (B, H, T, ...)
    pad = -x.shape[2] % C
    if pad:
        x = F.pad(x, (0, 0) * (x.ndim - 3) + (0, pad))
    return x.reshape(*x.shape[:2], -1, C, *x.shape[3:])


def _chunk_core(q, k, v, g, beta, S0, *, rule, scale):
    """The chunked form on (B, H, N, C, ...) blocks from state S0: (o blocks (B, H, N, C, Dv), final state)."""
    C = q.shape[-2]
    Dv, Dk = v.shape[-1], k.shape[-1]
    G = g.cumsum(-1)  # (B, H, N, C) log decay from the chunk start up to step i (inclusive)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # seg[i, j] = g_{j+1} + ... + g_i = G_i - G_j, summed directly rather than subtracted: with
    # g = -20 per step G reaches -1000s and the difference would lose the digits that dg needs.
    seg = g[..., :, None].expand(*g.shape, C).tril(-1).cumsum(-2)  # (B, H, N, C, C)
    # Mask before exp: e^{seg} only where j <= i, so no overflow (nor inf * 0 = NaN in backward).
    decay = seg.masked_fill_(~causal, -math.inf).exp_()  # (B, H, N, C, C), zero above the diagonal
    kb = k * beta[..., None]  # (B, H, N, C, Dk)
    if rule == "delta":
        A = kb @ k.transpose(-1, -2) * decay  # (B, H, N, C, C), used below its diagonal only
        rhs = torch.cat([v * beta[..., None], kb * G.exp()[..., None]], dim=-1)  # (B, H, N, C, Dv+Dk)
        # The solver reads the strict lower triangle only and takes I on the diagonal: A stands for I + A
        # (its gradient is projected back onto the strict lower triangle).
        # Batch dims are flattened: the 5-D batched solver is ~100x slower on CPU than the 3-D one.
        solved = torch.linalg.solve_triangular(A.reshape(-1, C, C), rhs.reshape(-1, C, Dv + Dk), upper=False,
                                               unitriangular=True)
        U, W = solved.view(*rhs.shape).split([Dv, Dk], dim=-1)  # (B, H, N, C, Dv), (B, H, N, C, Dk)
    else:
        U, W = v * beta[..., None], None  # d_j = beta_j v_j needs no solve

    k_end = k * decay[..., -1, :, None]  # (B, H, N, C, Dk) K_end: e^{G_C - G_j} k_j
    a_chunk = G[..., -1].exp()[..., None, None]  # (B, H, N, 1, 1) e^{G_C}, the decay over a whole chunk
    S = S0  # (B, H, Dv, Dk)
    # Chunks are visited with unbind, not x[:, :, n]: its backward stacks the slices' gradients
    # once instead of scattering each into a full-size zero tensor (quadratic in N).
    starts = []
    if rule == "delta":
        ds = []
        for U_n, W_n, k_n, a_n in zip(U.unbind(2), W.unbind(2), k_end.unbind(2), a_chunk.unbind(2)):
            starts.append(S)  # the only sequential part: pass the state from chunk to chunk
            D_n = U_n - W_n @ S.transpose(-1, -2)  # (B, H, C, Dv)
            ds.append(D_n)
            S = a_n * S + D_n.transpose(-1, -2) @ k_n
        D = torch.stack(ds, dim=2)  # (B, H, N, C, Dv)
    else:
        D = U
        writes = D.transpose(-1, -2) @ k_end  # (B, H, N, Dv, Dk) each chunk's own write
        for w_n, a_n in zip(writes.unbind(2), a_chunk.unbind(2)):
            starts.append(S)
            S = a_n * S + w_n
    starts = torch.stack(starts, dim=2)  # (B, H, N, Dv, Dk) state entering each chunk

    q = q * scale
    o = (q * G.exp()[..., None]) @ starts.transpose(-1, -2)  # (B, H, N, C, Dv) from earlier chunks
    o = o + (q @ k.transpose(-1, -2) * decay) @ D  # + within the chunk
    return o, S


# ----------------------------------------------------------------------------- kernel


@functools.lru_cache(maxsize=None)
def _recurrent_scan_kernel():
    """Build the Triton recurrent kernel (triton imported lazily, on first use)."""
    import triton
    import triton.language as tl

    @triton.jit
    def recurrent_scan(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, o_ptr, s_ptr, T, H, scale,
                       DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       DELTA: tl.constexpr):
        # One program per (batch*head, block of BV value rows): rows of S evolve independently.
        i_bh = tl.program_id(0)
        i_b, i_h = i_bh // H, i_bh % H
        rk = tl.arange(0, BK)
        rv = tl.program_id(1) * BV + tl.arange(0, BV)
        mk, mv = rk < DK, rv < DV
        s_offs = i_bh * DV * DK + rv[:, None] * DK + rk[None, :]  # state [B, H, Dv, Dk]
        s_mask = mv[:, None] & mk[None, :]
        S = tl.load(s_ptr + s_offs, mask=s_mask, other=0.0).to(tl.float32)  # (BV, BK) in registers
        for t in range(0, T):
            row = (i_b * T + t) * H + i_h  # index of (b, t, h) in [B, T, H]
            k = tl.load(k_ptr + row * DK + rk, mask=mk, other=0.0).to(tl.float32)
            q = tl.load(q_ptr + row * DK + rk, mask=mk, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + row * DV + rv, mask=mv, other=0.0).to(tl.float32)
            a = tl.exp(tl.load(g_ptr + row).to(tl.float32))
            b = tl.load(beta_ptr + row).to(tl.float32)
            S = S * a
            if DELTA:
                v = v - tl.sum(S * k[None, :], axis=1)
            S = S + (b * v)[:, None] * k[None, :]
            o = tl.sum(S * q[None, :], axis=1) * scale
            tl.store(o_ptr + row * DV + rv, o, mask=mv)
        tl.store(s_ptr + s_offs, S, mask=s_mask)

    return recurrent_scan


def _recurrent_scan(q, k, v, g, beta, S0, *, rule, scale):
    """Run our Triton recurrent kernel from float32 state S0 (forward only): (o in v's dtype, state float32).

    CPU tensors work under TRITON_INTERPRET=1."""
    import triton

    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    o = torch.empty(B, T, H, Dv, dtype=torch.float32, device=q.device)
    # The kernel reads its start state from this buffer and overwrites it with the final state.
    S = S0.contiguous().clone()
    BK = triton.next_power_of_2(Dk)
    BV = min(32, triton.next_power_of_2(Dv))
    grid = (B * H, triton.cdiv(Dv, BV))
    _recurrent_scan_kernel()[grid](q, k, v, g, beta, o, S, T, H, float(scale),
                                   DK=Dk, DV=Dv, BK=BK, BV=BV, DELTA=rule == "delta")
    return o.to(v.dtype), S


def _fla_scan(q, k, v, g, beta, *, rule, scale, initial_state):
    """flash-linear-attention chunk kernels (differentiable). fla's state is key-first [B, H, Dk, Dv]."""
    h0 = None if initial_state is None else initial_state.float().transpose(-1, -2).contiguous()  # (B, H, Dk, Dv)
    g = g.float().contiguous()
    if rule == "delta":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        o, ht = chunk_gated_delta_rule(q.contiguous(), k.contiguous(), v.contiguous(), g, beta.contiguous(),
                                       scale=scale, initial_state=h0, output_final_state=True,
                                       use_qk_l2norm_in_kernel=False)
    else:
        from fla.ops.simple_gla import chunk_simple_gla

        vb = (v * beta[..., None].to(v.dtype)).contiguous()  # fold beta into v: S += (beta v) k^T
        o, ht = chunk_simple_gla(q.contiguous(), k.contiguous(), vb, g=g, scale=scale,
                                 initial_state=h0, output_final_state=True)
    return o.to(v.dtype), ht.float().transpose(-1, -2).contiguous()  # (B, H, Dv, Dk)


def _kernel_unavailable(x):
    """Why impl="kernel" cannot run on x's device, or None when it can."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not x.is_cuda and not interpret:
        return f"impl='kernel' needs CUDA tensors (got device {x.device}); use impl='chunk' or 'auto'"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "impl='kernel' needs triton, which is not installed; use impl='chunk' or 'auto'"
    if x.is_cuda:
        try:
            import fla.ops  # noqa: F401
        except ImportError:
            return "impl='kernel' needs flash-linear-attention (fla), which is not installed; use impl='chunk'"
    return None


def ssm_scan_kernel(q, k, v, g, beta, *, rule, scale=None, initial_state=None):
    """GPU path: our recurrent Triton kernel for short no-grad calls (decoding), fla otherwise."""
    (B, T, H, Dk, Dv), dt = _check(q, k, v, g, beta, rule, initial_state)
    reason = _kernel_unavailable(q)
    if reason:
        raise RuntimeError(reason)
    if dt == torch.float64:
        raise ValueError("impl='kernel' computes in float32 and does not take float64 inputs; use impl='chunk'")
    if T == 0:
        return _empty_scan(q, v, initial_state, dt)
    scale = Dk**-0.5 if scale is None else scale
    tensors = (q, k, v, g, beta, initial_state)
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)
    if not q.is_cuda:  # TRITON_INTERPRET=1 on CPU: only our own kernel, for testing
        if needs_grad:
            raise RuntimeError("the interpreted Triton kernel has no backward; use impl='chunk' for gradients")
    elif T > RECURRENT_MAX_T or needs_grad:
        return _fla_scan(q, k, v, g, beta, rule=rule, scale=scale, initial_state=initial_state)
    S0 = _initial_state(initial_state, q, v, torch.float32)
    return _recurrent_scan(q, k, v, g, beta, S0, rule=rule, scale=scale)


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
        use_kernel = q.is_cuda and dt == torch.float32 and _kernel_unavailable(q) is None
        if not use_kernel and T == 1 and all(x.dtype == torch.float32 for x in (q, k, v, g, beta)):
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
        if not x.is_floating_point():
            raise ValueError(f"{name} must have a floating-point dtype, got {x.dtype}")
    return (B, T, H, Dk, Dv), _compute_dtype(q, k, v, g, beta)


def _check_chunk_size(chunk_size):
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _compute_dtype(*xs):
    """promote(float32, dtypes of xs): float32, or float64 when an input is float64."""
    return functools.reduce(torch.promote_types, (x.dtype for x in xs), torch.float32)


def _initial_state(initial_state, q, v, dtype):
    """initial_state in dtype, or zeros [B, H, Dv, Dk] on q's device when it is None."""
    if initial_state is None:
        B, _, H, Dk = q.shape
        return torch.zeros(B, H, v.shape[-1], Dk, dtype=dtype, device=q.device)
    return initial_state.to(dtype)


def _empty_scan(q, v, initial_state, dtype):
    """The T = 0 result: (o [B, 0, H, Dv] in v's dtype, a copy of the initial state in dtype)."""
    B, _, H, _ = q.shape
    return v.new_zeros(B, 0, H, v.shape[-1]), _initial_state(initial_state, q, v, dtype).clone()
