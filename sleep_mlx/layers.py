"""Modules of the hybrid (SPEC section 2): RMSNorm, rotary, Attention, SSMMixer, MLP, Block.

MLX mirror of sleep_torch/layers.py: same classes, arguments and parameter names (= checkpoint
keys); `__call__` where torch has `forward`. The mixers are pure with respect to their caches: they
take what came before (past keys/values, the SSM state, the short-conv tail) as arguments and return
the new pieces, so the model decides what a wake pass keeps and what a sleep pass throws away.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn

from common.config import ModelConfig
from common.sleep import AttentionCache, SSMCache
from sleep_mlx import ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dim,))

    def __call__(self, x):
        # x * rsqrt(mean(x^2) + eps) * w in float32: bit-equal to the plain formula for fp32 inputs; for
        # bf16 it rounds once after the weight, torch rounds before it (a last-bit difference).
        return mx.fast.rms_norm(x, self.weight, self.eps)


class LinearPack:
    """Linear layers that read the same input, as one matrix product (inference).

    Mirror of sleep_torch.layers.LinearPack. Until `pack` the layers run one by one. `pack` puts their
    weights (and biases) into one array and makes each parameter a view of its part (no extra memory).
    mlx[cpu]'s products run about 2x faster with the array stored transposed, [in, sum of outs], for
    every shape and length (docs/BENCHMARKS.md section 5), so here TRANSPOSE_RATIO is 0 (always) and
    FUSED_MAX_TOKENS None (no limit). Once a parameter is replaced (`update`, an optimizer step,
    `load_arrays`) the pack is let go and the layers run one by one again. Quantized layers are left
    as they are.
    """

    FUSED_MAX_TOKENS = None
    TRANSPOSE_RATIO = 0

    def __init__(self, owner: nn.Module, *names: str):
        self.owner, self.names = owner, names  # by name: a module replaced later (nn.quantize) is seen
        self.weight = self.bias = self.transposed = self._storage = None
        self.sizes = [layer.weight.shape[0] for layer in self.linears]
        self.cuts = [sum(self.sizes[:i]) for i in range(1, len(self.sizes))]  # mx.split's indices

    @property
    def linears(self) -> list:
        return [getattr(self.owner, name) for name in self.names]

    def _parameters(self):
        """What identifies the parameters' storage (the arrays themselves: MLX replaces, never writes)."""
        return [p for layer in self.linears for p in (layer.weight, getattr(layer, "bias", None)) if p is not None]

    def _valid(self) -> bool:
        """Packed, and every parameter still a view of the array (else the array is let go)."""
        if self._storage is not None and any(a is not b for a, b in zip(self._parameters(), self._storage)):
            self.weight = self.bias = self._storage = None
        return self._storage is not None

    def pack(self) -> None:
        if any(type(layer) is not nn.Linear for layer in self.linears):
            return  # quantized layers (io._load_quantized) keep their own packed format
        transposed = sum(self.sizes) >= self.TRANSPOSE_RATIO * self.linears[0].weight.shape[1]
        if not transposed and len(self.sizes) == 1:
            return
        rows = mx.concatenate([layer.weight for layer in self.linears])  # [sum of outs, in]
        self.weight = mx.contiguous(rows.T) if transposed else rows
        start = 0
        for layer, n in zip(self.linears, self.sizes):
            layer.weight = self.weight[:, start:start + n].T if transposed else self.weight[start:start + n]
            start += n
        if "bias" in self.linears[0]:
            self.bias = mx.concatenate([layer.bias for layer in self.linears])
            start = 0
            for layer, n in zip(self.linears, self.sizes):
                layer.bias, start = self.bias[start:start + n], start + n
        self.transposed = transposed
        self._storage = self._parameters()
        mx.eval(self._storage, self.weight)

    def __call__(self, x) -> list:
        """Each layer's output, in order (parts of one product's output when packed)."""
        limit = self.FUSED_MAX_TOKENS
        if (limit is not None and x.size > limit * x.shape[-1]) or not self._valid():
            return [layer(x) for layer in self.linears]
        y = x @ self.weight if self.transposed else x @ self.weight.T
        if self.bias is not None:
            y = y + self.bias
        return mx.split(y, self.cuts, -1)


def rotary(x, positions, inv_freq):
    """Rotate pairs (i, i + D/2) of x [B, T, H, D] by angle position * inv_freq[i] ("rotate_half").

    inv_freq [D/2] float32 comes from ModelConfig.rope_inv_freq (theta^(-2i/D), or a scaled rope).
    """
    return rotate(x, *rotary_table(positions, inv_freq))


def rotary_table(positions, inv_freq):
    """cos, sin [T, D] float32 of the angles position * inv_freq (each half-size row repeated twice)."""
    angles = positions.astype(mx.float32)[:, None] * inv_freq[None, :]  # (T, D/2)
    cos, sin = mx.cos(angles), mx.sin(angles)
    return mx.concatenate([cos, cos], -1), mx.concatenate([sin, sin], -1)


def rotate(x, cos, sin):
    """x [B, T, H, D] rotated by the angles of `rotary_table` rows [T, D]: x*cos + rotate_half(x)*sin.

    Plain ops rather than mx.fast.rope: the same float32 arithmetic as the torch backend."""
    half = x.shape[-1] // 2
    x32 = x.astype(mx.float32)
    rotated = mx.concatenate([-x32[..., half:], x32[..., :half]], -1)
    return (x32 * cos[:, None] + rotated * sin[:, None]).astype(x.dtype)


GROW = 256  # attention cache buffers grow in chunks of this many tokens (doubling), up to 2L-1 / L


class Attention(nn.Module):
    """Causal softmax attention over the cached keys/values plus the new tokens.

    Positions count from the start of the current window (cached tokens of the previous window have
    negative positions), so the rotary angles stay small forever. Keys are cached rotated (common.sleep
    AttentionCache): a call rotates only its new keys, and a sliding eviction re-rotates the kept ones
    once. The cache buffers grow (GROW slots, doubling) to at most `capacity` = L (hard) or 2L-1
    (sliding) tokens; MLX arrays are immutable, so new keys go in with mx.slice_update (which reuses
    the buffer's memory when nothing else holds it). Pretrained variants (SPEC section 7): grouped-query attention
    (n_kv_heads key/value heads, each serving n_heads / n_kv_heads query heads), q/k/v biases,
    per-head RMSNorm of q and k before rotary.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim, self.window = c.n_heads, c.kv_heads, c.head_dim, c.window
        self.capacity = 2 * c.window - 1 if c.eviction == "sliding" else c.window
        self.q_proj = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=c.attn_bias)
        self.k_proj = nn.Linear(c.d_model, c.kv_heads * c.head_dim, bias=c.attn_bias)
        self.v_proj = nn.Linear(c.d_model, c.kv_heads * c.head_dim, bias=c.attn_bias)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.d_model, bias=False)
        self.qkv, self.out = LinearPack(self, "q_proj", "k_proj", "v_proj"), LinearPack(self, "o_proj")
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.norm_eps)
        self.qk_norm = c.qk_norm
        # Rotary inverse frequencies (float32; the leading underscore keeps them out of the parameters), and
        # cos/sin of every window position -L..L-1, computed once.
        self._inv_freq = mx.array(c.rope_inv_freq(), dtype=mx.float32)
        self._table = None

    def new_cache(self, batch_size: int) -> AttentionCache:
        """No keys/values yet: [B, 0, H_kv, D] each, in the weights' dtype."""
        empty = mx.zeros((batch_size, 0, self.n_kv_heads, self.head_dim), dtype=self.q_proj.weight.dtype)
        return AttentionCache(k=empty, v=empty)

    def _cos_sin(self, start: int, n: int):
        """cos, sin [n, D] of window positions start..start+n-1 (from the table when it covers them)."""
        L = self.window
        if self._table is None:
            self._table = rotary_table(mx.arange(-L, L), self._inv_freq)
        if -L <= start and start + n <= L:
            cos, sin = self._table
            return cos[start + L:start + L + n], sin[start + L:start + L + n]
        return rotary_table(mx.arange(start, start + n), self._inv_freq)

    def __call__(self, x, cache: AttentionCache, start: int, store: bool):
        """x [B, T, d] at window positions start..start+T-1, after the cache's `past` kept tokens and
        the current window's first `start` tokens.

        Returns (out [B, T, d], cache with the new tokens' keys/values when `store`, else None).
        """
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        q = q.reshape(B, T, self.n_heads, self.head_dim)
        k = k.reshape(B, T, self.n_kv_heads, self.head_dim)
        v = v.reshape(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = self._cos_sin(start, T)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        held = cache.past + start  # slots before the new tokens
        if store:
            cache = self._append(cache, held, k, v)
            keys, values = cache.k[:, :held + T], cache.v[:, :held + T]
        else:
            keys, values = mx.concatenate([cache.k[:, :held], k], 1), mx.concatenate([cache.v[:, :held], v], 1)
        # The first query reaches back L-1 positions: older slots are never seen by these queries.
        lo = max(held - self.window + 1, 0)
        keys, values = keys[:, lo:], values[:, lo:]  # (B, S, H_kv, D)
        mask = None
        if T > 1:  # each query sees itself and the L-1 tokens before it (the window), never the future
            k_pos = mx.arange(lo - held, T)
            q_pos = k_pos[-T:]
            mask = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - self.window)
        out = mx.fast.scaled_dot_product_attention(q.transpose(0, 2, 1, 3), keys.transpose(0, 2, 1, 3),
                                                   values.transpose(0, 2, 1, 3), scale=self.head_dim ** -0.5,
                                                   mask=mask)  # GQA native
        out = out.transpose(0, 2, 1, 3).reshape(B, T, -1)  # (B, T, H*D)
        return self.out(out)[0], (cache if store else None)

    def _append(self, cache: AttentionCache, held: int, k, v) -> AttentionCache:
        """The cache with k, v [B, T, H_kv, D] written at slots held..held+T-1."""
        assert held == cache.length, (held, cache.length)
        T, room = k.shape[1], cache.k.shape[1]
        if held + T > room:  # full: new buffers of the full capacity
            pad = mx.zeros((k.shape[0], self._room(held + T, room) - held - T, *k.shape[2:]), dtype=k.dtype)
            keys = mx.concatenate([cache.k[:, :held], k, pad], 1)
            values = mx.concatenate([cache.v[:, :held], v, pad.astype(v.dtype)], 1)
        else:
            at = mx.array([held])
            keys, values = mx.slice_update(cache.k, k, at, (1,)), mx.slice_update(cache.v, v, at, (1,))
        return AttentionCache(keys, values, cache.past, held + T)

    def _room(self, need: int, room: int) -> int:
        """Slots of a new buffer for `need` tokens: grown by doubling from GROW slots, at most `capacity`
        (or exactly `need` beyond it: a window changed at run time)."""
        return need if need > self.capacity else min(self.capacity, max(-(-need // GROW) * GROW, 2 * room))

    def rotated(self, cache: AttentionCache) -> AttentionCache:
        """A cache read with unrotated keys (memory format_version 1) with its keys rotated."""
        cos, sin = self._cos_sin(-cache.past, cache.length)
        return dataclasses.replace(cache, k=rotate(cache.k, cos, sin), mark=None)

    def evict(self, cache: AttentionCache, keep: int) -> AttentionCache:
        """After a sleep: the last `keep` tokens (0: hard eviction), re-rotated to the next window,
        which starts right after the last one (at -offset from the old window's start)."""
        n = min(keep, cache.length)
        if n == 0:  # the buffers stay, as free room
            return AttentionCache(cache.k, cache.v, 0, 0, cache.mark)
        offset = cache.length - cache.past
        cos, sin = self._cos_sin(-offset, 1)  # R(-offset)
        keys = rotate(cache.k[:, cache.length - n:cache.length], cos, sin)
        values = cache.v[:, cache.length - n:cache.length]
        new = self._append(AttentionCache(keys[:, :0], values[:, :0]), 0, keys, values)
        return dataclasses.replace(new, past=n)


def causal_conv(x, weight, tail):
    """Depthwise causal conv: out[t, c] = sum_j weight[c, j] * x[t-(K-1)+j, c].

    x [B, T, C]; weight [C, K]; tail [B, K-1, C] holds the inputs before x (zeros at a window start).
    Written as K shifted multiplies, like the torch backend (same order of additions).
    """
    K = weight.shape[1]
    xp = mx.concatenate([tail, x], 1)  # (B, K-1+T, C)
    T = x.shape[1]
    out = xp[:, 0:T] * weight[:, 0]
    for j in range(1, K):
        out = out + xp[:, j:j + T] * weight[:, j]
    return out, xp[:, T:]  # new tail = the last K-1 inputs


class ShortConv(nn.Module):
    """Holds a depthwise conv kernel [channels, K] (applied by `causal_conv`)."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.weight = mx.zeros((channels, size))


def l2_normalize(x, eps: float = 1e-6):
    return x * mx.rsqrt((x * x).sum(-1, keepdims=True) + eps)


class SSMMixer(nn.Module):
    """Gated fast-weight mixer: S_t = a_t S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T (delta rule)
    or S_t = a_t S_{t-1} + b_t v_t k_t^T (hebbian); o_t = S_t q_t / sqrt(Dk)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.H, self.Dk, self.Dv = c.ssm_heads, c.ssm_head_dim, c.ssm_v_dim
        self.rule, self.conv_size, self.eps = c.ssm_rule, c.conv_size, c.norm_eps
        self.scan_impl = "auto"  # set by HybridLM.set_scan_impl
        dk, dv = self.H * self.Dk, self.H * self.Dv
        self.q_proj = nn.Linear(c.d_model, dk, bias=False)
        self.k_proj = nn.Linear(c.d_model, dk, bias=False)
        self.v_proj = nn.Linear(c.d_model, dv, bias=False)
        self.a_proj = nn.Linear(c.d_model, self.H, bias=False)
        self.b_proj = nn.Linear(c.d_model, self.H, bias=False)
        self.g_proj = nn.Linear(c.d_model, dv, bias=False)
        self.o_proj = nn.Linear(dv, c.d_model, bias=False)
        self.inputs = LinearPack(self, "q_proj", "k_proj", "v_proj", "b_proj", "a_proj", "g_proj")
        self.out = LinearPack(self, "o_proj")
        if c.conv_size:
            self.q_conv = ShortConv(dk, c.conv_size)
            self.k_conv = ShortConv(dk, c.conv_size)
            self.v_conv = ShortConv(dv, c.conv_size)
        self.A_log = mx.zeros((self.H,))
        self.dt_bias = mx.zeros((self.H,))
        self.o_norm = RMSNorm(self.Dv, c.norm_eps)

    def new_cache(self, batch_size: int) -> SSMCache:
        """S_0 = 0 [B, H, Dv, Dk] in float32 (whatever the compute dtype); no conv tail yet."""
        zero = mx.zeros((batch_size, self.H, self.Dv, self.Dk), dtype=mx.float32)
        return SSMCache(committed=zero, running=zero, conv=None)

    def __call__(self, x, state, conv_tail=None):
        """x [B, T, d]; state [B, H, Dv, Dk] float32; conv_tail [B, K-1, C] or None (= zeros).

        Returns (out [B, T, d], new state, new conv tail or None).
        """
        B, T, _ = x.shape
        q, k, v, b, a, gate = self.inputs(x)
        qkv = mx.concatenate([q, k, v], -1)  # (B, T, 2*dk + dv)
        if self.conv_size:
            if conv_tail is None:
                conv_tail = mx.zeros((B, self.conv_size - 1, qkv.shape[-1]), dtype=qkv.dtype)
            weight = mx.concatenate([self.q_conv.weight, self.k_conv.weight, self.v_conv.weight], 0)
            qkv, conv_tail = causal_conv(qkv, weight, conv_tail)
            qkv = nn.silu(qkv)
        dk = self.H * self.Dk
        q = l2_normalize(qkv[..., :dk].reshape(B, T, self.H, self.Dk))
        k = l2_normalize(qkv[..., dk:2 * dk].reshape(B, T, self.H, self.Dk))
        v = qkv[..., 2 * dk:].reshape(B, T, self.H, self.Dv)
        beta = mx.sigmoid(b.astype(mx.float32))  # (B, T, H)
        g = -mx.exp(self.A_log.astype(mx.float32)) * nn.softplus(a.astype(mx.float32) + self.dt_bias.astype(mx.float32))
        o, state = ops.ssm_scan(q, k, v, g, beta, rule=self.rule, initial_state=state, impl=self.scan_impl)
        o = self.o_norm(o)  # per head over Dv, one weight shared by all heads
        y = o.reshape(B, T, -1) * nn.silu(gate)
        return self.out(y)[0], state, conv_tail


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(config.mlp_hidden, config.d_model, bias=False)
        self.gate_up, self.down = LinearPack(self, "gate_proj", "up_proj"), LinearPack(self, "down_proj")

    def __call__(self, x):
        gate, up = self.gate_up(x)
        return self.down(nn.silu(gate) * up)[0]


class Block(nn.Module):
    """h = h + mixer(norm1(h)); h = h + mlp(norm2(h)). The mixer is `attn` (A) or `ssm` (S).

    SSM blocks of a config with ssm_mlp=False have no MLP and no norm2 (the blocks a retrofit inserts).
    """

    def __init__(self, config: ModelConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.norm1 = RMSNorm(config.d_model, config.norm_eps)
        if kind == "A":
            self.attn = Attention(config)
        else:
            self.ssm = SSMMixer(config)
        self.has_mlp = config.has_mlp(kind)
        if self.has_mlp:
            self.norm2 = RMSNorm(config.d_model, config.norm_eps)
            self.mlp = MLP(config)

    def new_cache(self, batch_size: int):
        """This block's empty cache (common.sleep): the mixer decides its kind."""
        return (self.attn if self.kind == "A" else self.ssm).new_cache(batch_size)

    def packs(self) -> list[LinearPack]:
        """This block's LinearPacks (HybridLM.for_inference packs them)."""
        packs = [self.attn.qkv, self.attn.out] if self.kind == "A" else [self.ssm.inputs, self.ssm.out]
        return packs + ([self.mlp.gate_up, self.mlp.down] if self.has_mlp else [])

    def __call__(self, h, *cache):
        """cache: (AttentionCache, start, store) for attention, (state, conv_tail) for SSM.

        Returns (h, extras): extras = (new cache or None,) for attention, (state, conv_tail) for SSM.
        """
        mixer = self.attn if self.kind == "A" else self.ssm
        out, *extras = mixer(self.norm1(h), *cache)
        h = h + out
        if self.has_mlp:
            h = h + self.mlp(self.norm2(h))
        return h, extras
