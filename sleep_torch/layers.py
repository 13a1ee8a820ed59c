"""Modules of the hybrid (SPEC section 2): RMSNorm, rotary, Attention, SSMMixer, MLP, Block.

The mixers are pure with respect to their caches: they take what came before (past keys/values,
the SSM state, the short-conv tail) as arguments and return the new pieces, so the model decides
what a wake pass keeps and what a sleep pass throws away. Parameter names equal checkpoint keys.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from common.config import ModelConfig
from common.sleep import AttentionCache, SSMCache
from sleep_torch import ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32 == self.weight.dtype:  # one fused op, the same arithmetic in float32
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class LinearPack:
    """Linear layers that read the same input, as one matrix product when that is faster (inference).

    Until `pack` the layers run one by one (training, and every model by default). `pack` moves their
    weights (and biases) into one buffer and makes each parameter a view of its part, so the packed
    product costs no extra memory and sees every later write through the parameters (`load_arrays`, an
    optimizer step). The buffer is stored transposed, [in, sum of outs], when the outputs number at
    least TRANSPOSE_RATIO x the inputs: MKL's one-token product runs up to 1.7x faster in that layout
    for such shapes and no faster for the others, while its multi-token products are faster in the
    default one (docs/BENCHMARKS.md section 5). So the packed product runs for inputs of at most
    FUSED_MAX_TOKENS tokens without autograd; otherwise (a prompt, training, or after `module.to(...)`
    gave the parameters new storage) the layers run one by one on their parameters, whatever their
    layout. One layer in the default layout has nothing to gain and is left as it is.
    """

    FUSED_MAX_TOKENS = 1
    TRANSPOSE_RATIO = 2

    def __init__(self, owner: nn.Module, *names: str):
        self.owner, self.names = owner, names  # by name: a module replaced later (nn.quantize) is seen
        self.weight = self.bias = self.transposed = self._storage = None
        self.sizes = [layer.out_features for layer in self.linears]

    @property
    def linears(self) -> list:
        return [getattr(self.owner, name) for name in self.names]

    def _parameters(self):
        """What identifies the parameters' storage (data pointers)."""
        return [p.data_ptr() for layer in self.linears for p in (layer.weight, layer.bias) if p is not None]

    def _valid(self) -> bool:
        """Packed, and every parameter still a view of the buffer (else the buffer is let go)."""
        if self._storage is not None and self._parameters() != self._storage:
            self.weight = self.bias = self._storage = None
        return self._storage is not None

    def pack(self) -> None:
        transposed = sum(self.sizes) >= self.TRANSPOSE_RATIO * self.linears[0].in_features
        if not transposed and len(self.sizes) == 1:
            return
        with torch.no_grad():
            rows = torch.cat([layer.weight.detach() for layer in self.linears])  # [sum of outs, in]
            self.weight = rows.t().contiguous() if transposed else rows
            start = 0
            for layer, n in zip(self.linears, self.sizes):
                layer.weight.data = self.weight[:, start:start + n].t() if transposed else self.weight[start:start + n]
                start += n
            if self.linears[0].bias is not None:
                self.bias = torch.cat([layer.bias.detach() for layer in self.linears])
                start = 0
                for layer, n in zip(self.linears, self.sizes):
                    layer.bias.data, start = self.bias[start:start + n], start + n
        self.transposed = transposed
        self._storage = self._parameters()

    def __call__(self, x) -> list:
        """Each layer's output, in order (views of one product's output when packed)."""
        if x.numel() > self.FUSED_MAX_TOKENS * x.shape[-1] or torch.is_grad_enabled() or not self._valid():
            return [layer(x) for layer in self.linears]
        y = x @ self.weight if self.transposed else F.linear(x, self.weight)
        if self.bias is not None:
            y = y + self.bias
        return list(y.split(self.sizes, -1))


def rotary(x, positions, inv_freq):
    """Rotate pairs (i, i + D/2) of x [B, T, H, D] by angle position * inv_freq[i] ("rotate_half").

    inv_freq [D/2] float32 comes from ModelConfig.rope_inv_freq (theta^(-2i/D), or a scaled rope).
    """
    return rotate(x, *rotary_table(positions, inv_freq))


def rotary_table(positions, inv_freq):
    """cos, sin [T, D] float32 of the angles position * inv_freq (each half-size row repeated twice)."""
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (T, D/2)
    return torch.cat([angles.cos(), angles.cos()], -1), torch.cat([angles.sin(), angles.sin()], -1)


def rotate(x, cos, sin):
    """x [B, T, H, D] rotated by the angles of `rotary_table` rows [T, D]: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    x32 = x.float()
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], -1)
    return (x32 * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


GROW = 256  # attention cache buffers grow in chunks of this many tokens (doubling), up to 2L-1 / L


class Attention(nn.Module):
    """Causal softmax attention over the cached keys/values plus the new tokens.

    Positions count from the start of the current window (cached tokens of the previous window have
    negative positions), so the rotary angles stay small forever. Keys are cached rotated (common.sleep
    AttentionCache): a call rotates only its new keys, and a sliding eviction re-rotates the kept ones
    once. The cache buffers grow (GROW slots, doubling) to at most `capacity` = L (hard) or 2L-1
    (sliding) tokens, and new keys are written in place when no autograd graph can see the buffers
    (inference); training builds new arrays instead. Pretrained variants (SPEC section 7):
    grouped-query attention (n_kv_heads key/value heads, each serving n_heads / n_kv_heads query
    heads), q/k/v biases, per-head RMSNorm of q and k before rotary.
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
        # Rotary inverse frequencies (float32, not a parameter; kept float32 whatever the model dtype), and
        # cos/sin of every window position -L..L-1, computed once per device.
        self._inv_freq = torch.tensor(c.rope_inv_freq(), dtype=torch.float32)
        self._table = None

    def new_cache(self, batch_size: int) -> AttentionCache:
        """No keys/values yet: [B, 0, H_kv, D] each, in the weights' dtype and device."""
        empty = self.q_proj.weight.new_zeros(batch_size, 0, self.n_kv_heads, self.head_dim)
        return AttentionCache(k=empty, v=empty)

    def _cos_sin(self, start: int, n: int):
        """cos, sin [n, D] of window positions start..start+n-1 (from the table when it covers them)."""
        L, device = self.window, self.q_proj.weight.device
        if self._table is None or self._table[0].device != device:
            self._inv_freq = self._inv_freq.to(device)
            self._table = rotary_table(torch.arange(-L, L, device=device), self._inv_freq)
        if -L <= start and start + n <= L:
            cos, sin = self._table
            return cos[start + L:start + L + n], sin[start + L:start + L + n]
        return rotary_table(torch.arange(start, start + n, device=device), self._inv_freq)

    def forward(self, x, cache: AttentionCache, start: int, store: bool):
        """x [B, T, d] at window positions start..start+T-1, after the cache's `past` kept tokens and
        the current window's first `start` tokens.

        Returns (out [B, T, d], cache with the new tokens' keys/values when `store`, else None).
        """
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = self._cos_sin(start, T)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        held = cache.past + start  # slots before the new tokens
        if store:
            cache = self._append(cache, held, k, v)
            keys, values = cache.k[:, :held + T], cache.v[:, :held + T]
        else:
            keys, values = torch.cat([cache.k[:, :held], k], 1), torch.cat([cache.v[:, :held], v], 1)
        # The first query reaches back L-1 positions: older slots are never seen by these queries.
        lo = max(held - self.window + 1, 0)
        keys, values = keys[:, lo:], values[:, lo:]  # (B, S, H_kv, D)
        mask = None
        if T > 1:  # each query sees itself and the L-1 tokens before it (the window), never the future
            k_pos = torch.arange(lo - held, T, device=x.device)
            q_pos = k_pos[-T:]
            mask = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - self.window)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        out = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*D)
        return self.out(out)[0], (cache if store else None)

    def _append(self, cache: AttentionCache, held: int, k, v) -> AttentionCache:
        """The cache with k, v [B, T, H_kv, D] written at slots held..held+T-1."""
        assert held == cache.length, (held, cache.length)
        T, room = k.shape[1], cache.k.shape[1]
        if torch.is_grad_enabled() and (k.requires_grad or cache.k.requires_grad):
            # autograd may hold views of the buffers: build new ones (the training path)
            return AttentionCache(torch.cat([cache.k[:, :held], k], 1), torch.cat([cache.v[:, :held], v], 1),
                                  cache.past, held + T)
        mark = cache.mark
        if mark is None or mark[0] != held or held + T > room:  # not ours to extend, or full: a new buffer
            size = (k.shape[0], self._room(held + T, room), *k.shape[2:])
            keys, values = k.new_zeros(size), v.new_zeros(size)
            keys[:, :held], values[:, :held] = cache.k[:, :held], cache.v[:, :held]
            mark = [held]
        else:
            keys, values = cache.k, cache.v
        keys[:, held:held + T], values[:, held:held + T] = k, v
        mark[0] = held + T
        return AttentionCache(keys, values, cache.past, held + T, mark)

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
        if n == 0:  # the buffers stay (a later append copies: `mark` no longer matches)
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
    Written as K shifted multiplies: on CPU this is much faster than a grouped conv1d backward.
    """
    K = weight.shape[1]
    xp = torch.cat([tail, x], 1)  # (B, K-1+T, C)
    T = x.shape[1]
    out = xp[:, 0:T] * weight[:, 0]
    for j in range(1, K):
        out = out + xp[:, j:j + T] * weight[:, j]
    return out, xp[:, T:]  # new tail = the last K-1 inputs


class ShortConv(nn.Module):
    """Holds a depthwise conv kernel [channels, K] (applied by `causal_conv`)."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels, size))


def l2_normalize(x, eps: float = 1e-6):
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


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
        self.A_log = nn.Parameter(torch.zeros(self.H))
        self.dt_bias = nn.Parameter(torch.zeros(self.H))
        self.o_norm = RMSNorm(self.Dv, c.norm_eps)

    def new_cache(self, batch_size: int) -> SSMCache:
        """S_0 = 0 [B, H, Dv, Dk] in float32 (whatever the compute dtype); no conv tail yet."""
        zero = self.A_log.new_zeros(batch_size, self.H, self.Dv, self.Dk, dtype=torch.float32)
        return SSMCache(committed=zero, running=zero, conv=None)

    def forward(self, x, state, conv_tail=None):
        """x [B, T, d]; state [B, H, Dv, Dk] float32; conv_tail [B, K-1, C] or None (= zeros).

        Returns (out [B, T, d], new state, new conv tail or None).
        """
        B, T, _ = x.shape
        q, k, v, b, a, gate = self.inputs(x)
        qkv = torch.cat([q, k, v], -1)  # (B, T, 2*dk + dv)
        if self.conv_size:
            if conv_tail is None:
                conv_tail = qkv.new_zeros(B, self.conv_size - 1, qkv.shape[-1])
            weight = torch.cat([self.q_conv.weight, self.k_conv.weight, self.v_conv.weight], 0)
            qkv, conv_tail = causal_conv(qkv, weight, conv_tail)
            qkv = F.silu(qkv)
        dk = self.H * self.Dk
        q = l2_normalize(qkv[..., :dk].reshape(B, T, self.H, self.Dk))
        k = l2_normalize(qkv[..., dk:2 * dk].reshape(B, T, self.H, self.Dk))
        v = qkv[..., 2 * dk:].reshape(B, T, self.H, self.Dv)
        beta = torch.sigmoid(b.float())  # (B, T, H)
        g = -torch.exp(self.A_log.float()) * F.softplus(a.float() + self.dt_bias.float())
        o, state = ops.ssm_scan(q, k, v, g, beta, rule=self.rule, initial_state=state, impl=self.scan_impl)
        o = self.o_norm(o)  # per head over Dv, one weight shared by all heads
        y = o.reshape(B, T, -1) * F.silu(gate)
        return self.out(y)[0], state, conv_tail


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(config.mlp_hidden, config.d_model, bias=False)
        self.gate_up, self.down = LinearPack(self, "gate_proj", "up_proj"), LinearPack(self, "down_proj")

    def forward(self, x):
        gate, up = self.gate_up(x)
        return self.down(F.silu(gate) * up)[0]


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

    def forward(self, h, *cache):
        """cache: (AttentionCache, start, store) for attention, (state, conv_tail) for SSM.

        Returns (h, extras): extras = (new cache or None,) for attention, (state, conv_tail) for SSM.
        """
        mixer = self.attn if self.kind == "A" else self.ssm
        out, *extras = mixer(self.norm1(h), *cache)
        h = h + out
        if self.has_mlp:
            h = h + self.mlp(self.norm2(h))
        return h, extras
