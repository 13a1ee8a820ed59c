"""An independent float64 numpy model of SPEC sections 2-3: the tests' ground truth for both backends.

Written from the SPEC, not from sleep_*/model.py, and deliberately plain: every window is run whole
(never streamed), the SSM recurrence is a loop over time, attention builds its mask from absolute
stream positions (rotary depends only on position differences, so this equals the backends'
window-relative positions), and sleep is Algorithm 1 literally: prelude once, looped blocks N times
from S_w, coda once from S_w on the last loop's output.

    reference_logits(config, weights, tokens, passes=None) -> logits [B, T, V] float64
        (SPEC section 2 models only: the section 7 additions, GQA, biases, qk-norm and MLP-free
        blocks, are not modelled, and their weight names fail the name check loudly)
    random_weights(config, seed) -> {canonical name: float32 array}, scaled so that every part of
        the model (peaked attention, open and closed gates, norm weights) changes the logits.
"""

from __future__ import annotations

import numpy as np

from common.checkpoint import param_shapes
from common.config import ModelConfig


def silu(x):
    return x / (1.0 + np.exp(-x))


def rmsnorm(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def l2_normalize(x):
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-6)


def rotary(x, positions, theta):
    """x [B, T, H, D] at absolute positions [T]; split-half ("rotate_half") convention."""
    D = x.shape[-1]
    freqs = theta ** (-np.arange(D // 2) * 2.0 / D)
    angles = positions[:, None] * freqs[None, :]  # (T, D/2)
    cos = np.concatenate([np.cos(angles)] * 2, -1)[None, :, None, :]  # (1, T, 1, D)
    sin = np.concatenate([np.sin(angles)] * 2, -1)[None, :, None, :]
    rotated = np.concatenate([-x[..., D // 2:], x[..., : D // 2]], -1)
    return x * cos + rotated * sin


def attention(c, W, p, x, positions, cache):
    """x [B, T, d] at absolute positions; cache = (keys, values, positions) kept from before the window.

    Returns (out, (k, v)) with this pass's in-window keys/values (unrotated, [B, T, H, D]).
    """
    B, T, _ = x.shape
    q, k, v = (x @ W[p + f"attn.{n}_proj.weight"].T for n in "qkv")
    q, k, v = (y.reshape(B, T, c.n_heads, c.head_dim) for y in (q, k, v))
    keys = np.concatenate([cache[0], k], 1)
    values = np.concatenate([cache[1], v], 1)
    k_pos = np.concatenate([cache[2], positions])
    qr, kr = rotary(q, positions, c.rope_theta), rotary(keys, k_pos, c.rope_theta)
    scores = np.einsum("bthd,bshd->bhts", qr, kr) * c.head_dim ** -0.5  # (B, H, T, S)
    # A token sees itself and the L-1 tokens before it, never the future (hard mode: the cache is
    # empty, so this is causal attention inside the window).
    seen = (k_pos[None, :] <= positions[:, None]) & (k_pos[None, :] > positions[:, None] - c.window)
    scores = np.where(seen[None, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhts,bshd->bthd", probs, values).reshape(B, T, -1)
    return out @ W[p + "attn.o_proj.weight"].T, (k, v)


def short_conv(x, weight):
    """out[t, c] = sum_j weight[c, j] * x[t-(K-1)+j, c], zeros before the pass's first token."""
    K = weight.shape[1]
    out = np.zeros_like(x)
    for t in range(x.shape[1]):
        for j in range(K):
            if t - (K - 1) + j >= 0:
                out[:, t] += weight[:, j] * x[:, t - (K - 1) + j]
    return out


def ssm(c, W, p, x, S):
    """x [B, T, d]; S [B, H, Dv, Dk] the state before the first token. Returns (out, final state)."""
    B, T, _ = x.shape
    H, Dk, Dv = c.ssm_heads, c.ssm_head_dim, c.ssm_v_dim
    q, k, v = (x @ W[p + f"ssm.{n}_proj.weight"].T for n in "qkv")
    if c.conv_size:
        q, k, v = (silu(short_conv(y, W[p + f"ssm.{n}_conv.weight"])) for y, n in zip((q, k, v), "qkv"))
    q, k = l2_normalize(q.reshape(B, T, H, Dk)), l2_normalize(k.reshape(B, T, H, Dk))
    v = v.reshape(B, T, H, Dv)
    beta = 1.0 / (1.0 + np.exp(-(x @ W[p + "ssm.b_proj.weight"].T)))  # (B, T, H)
    g = -np.exp(W[p + "ssm.A_log"]) * np.logaddexp(0.0, x @ W[p + "ssm.a_proj.weight"].T + W[p + "ssm.dt_bias"])
    S = S.copy()
    o = np.zeros((B, T, H, Dv))
    for t in range(T):
        kt, vt, a, bt = k[:, t], v[:, t], np.exp(g[:, t])[..., None, None], beta[:, t][..., None, None]
        outer = np.einsum("bhv,bhk->bhvk", vt, kt)
        if c.ssm_rule == "delta":  # S (I - b k k^T) = S - b (S k) k^T
            Sk = np.einsum("bhvk,bhk->bhv", S, kt)
            S = a * (S - bt * np.einsum("bhv,bhk->bhvk", Sk, kt)) + bt * outer
        else:
            S = a * S + bt * outer
        o[:, t] = np.einsum("bhvk,bhk->bhv", S, q[:, t]) * Dk ** -0.5
    y = rmsnorm(o, W[p + "ssm.o_norm.weight"], c.norm_eps).reshape(B, T, H * Dv)
    y = y * silu(x @ W[p + "ssm.g_proj.weight"].T)
    return y @ W[p + "ssm.o_proj.weight"].T, S


def block(c, W, i, h, positions, cache, S):
    """One block over a whole window. Returns (h, mixer extra): (k, v) for A, the new state for S."""
    p = f"layers.{i}."
    x = rmsnorm(h, W[p + "norm1.weight"], c.norm_eps)
    if c.layer_types[i] == "A":
        out, extra = attention(c, W, p, x, positions, cache)
    else:
        out, extra = ssm(c, W, p, x, S)
    h = h + out
    x = rmsnorm(h, W[p + "norm2.weight"], c.norm_eps)
    mlp = (silu(x @ W[p + "mlp.gate_proj.weight"].T) * (x @ W[p + "mlp.up_proj.weight"].T))
    return h + mlp @ W[p + "mlp.down_proj.weight"].T, extra


def reference_logits(config: ModelConfig, weights: dict, tokens, passes: int | None = None) -> np.ndarray:
    c = config
    W = {name: np.asarray(value, dtype=np.float64) for name, value in weights.items()}
    assert set(W) == set(param_shapes(c)), "weights must carry exactly the canonical names"
    N = c.sleep_passes if passes is None else passes
    tokens = np.asarray(tokens)
    B, T = tokens.shape
    L, D, (a, b) = c.window, c.n_layers, c.loop_range
    attn = [i for i in range(D) if c.layer_types[i] == "A"]
    S_w = {i: np.zeros((B, c.ssm_heads, c.ssm_v_dim, c.ssm_head_dim)) for i in range(D) if i not in attn}
    empty = (np.zeros((B, 0, c.n_heads, c.head_dim)),) * 2 + (np.zeros(0),)
    cache = {i: empty for i in attn}  # wake-pass keys/values kept from before the current window
    head = W["embed.weight"] if c.tie_embeddings else W["lm_head.weight"]
    logits = []
    for start in range(0, T, L):
        positions = np.arange(start, min(start + L, T), dtype=np.float64)
        x = W["embed.weight"][tokens[:, start:start + L]]  # (B, t, d)

        # Wake: all blocks once from S_w; its logits are the predictions for this window.
        h, wake_kv = x, {}
        for i in range(D):
            h, extra = block(c, W, i, h, positions, cache.get(i), S_w.get(i))
            if i in attn:
                wake_kv[i] = extra  # its SSM states are not kept: sleep starts again from S_w
        logits.append(rmsnorm(h, W["norm.weight"], c.norm_eps) @ head.T)
        if len(positions) < L:
            break  # a partial final window is woken, not slept

        # Sleep: prelude once, the looped blocks N times (states carried from pass to pass, each pass
        # fed the previous one's output), the coda once from S_w on the last loop's output.
        S_new = dict(S_w)

        def run(i, h, states):
            h, extra = block(c, W, i, h, positions, cache.get(i), states.get(i))
            if i not in attn:
                S_new[i] = extra
            return h

        h = x
        for i in range(a):
            h = run(i, h, S_w)
        for _ in range(N):
            for i in range(a, b):
                h = run(i, h, S_new)
        for i in range(b, D):
            h = run(i, h, S_w)
        S_w = S_new

        # Eviction: hard forgets the window; sliding keeps the last L-1 wake-pass keys/values.
        keep = L - 1 if c.eviction == "sliding" else 0
        for i in attn:
            k_all, v_all = (np.concatenate([cache[i][j], wake_kv[i][j]], 1) for j in (0, 1))
            pos = np.concatenate([cache[i][2], positions])
            cut = len(pos) - keep
            cache[i] = (k_all[:, cut:], v_all[:, cut:], pos[cut:])
    return np.concatenate(logits, 1)


def random_weights(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Weights that make every detail visible in the logits (init weights are too gentle for that):
    unit-variance activations, peaked attention, norm weights away from 1, gates spread from
    nearly closed to nearly open."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in param_shapes(config).items():
        leaf = name.rsplit(".", 2)[-2] if name.endswith(".weight") else name.rsplit(".", 1)[-1]
        if "norm" in leaf:
            value = 1.0 + 0.3 * rng.standard_normal(shape)
        elif leaf == "A_log":
            value = np.log(rng.uniform(0.05, 2.0, shape))
        elif leaf == "dt_bias":
            value = rng.uniform(-2.0, 1.0, shape)
        elif leaf == "embed":
            value = rng.standard_normal(shape)
        elif leaf.endswith("_conv"):
            value = rng.uniform(-1.0, 1.0, shape)
        else:  # linear [out, in]: unit gain, attention q/k larger so that softmax is peaked
            gain = 2.0 if leaf in ("q_proj", "k_proj") and ".attn." in name else 1.0
            value = gain * rng.standard_normal(shape) / np.sqrt(shape[1])
        out[name] = value.astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------
# The grid both backends' tests/*/test_reference.py run: every (eviction, looped range, N) with the
# (rule, tied head, conv) combinations of a 2-level orthogonal array, so every pair of settings meets.
BASE = dict(vocab_size=16, d_model=24, n_heads=2, head_dim=8, ssm_heads=2, ssm_head_dim=8, ssm_value_dim=12,
            mlp_hidden=32, window=8)
RANGES = {"all": dict(n_layers=4, sleep_layers=None), "loop1:4of6": dict(n_layers=6, sleep_layers=(1, 4))}
COMBOS = [("delta", True, 4), ("delta", False, 0), ("hebbian", True, 0), ("hebbian", False, 4)]
SEQ_LEN = 3 * BASE["window"] + 5  # three full windows (each sleeps), then a partial one


def grid() -> dict[str, ModelConfig]:
    cases = {}
    for e, eviction in enumerate(("hard", "sliding")):
        for r, (range_id, layers) in enumerate(RANGES.items()):
            for n, passes in enumerate((1, 2, 3)):
                rule, tied, conv = COMBOS[(2 * e + r + n) % 4]
                name = f"{eviction}-{range_id}-N{passes}-{rule}-{'tied' if tied else 'untied'}-conv{conv}"
                cases[name] = ModelConfig.from_name("debug", **BASE, **layers, eviction=eviction,
                                                    sleep_passes=passes, ssm_rule=rule, tie_embeddings=tied,
                                                    conv_size=conv)
    return cases


def random_splits(T: int, seed: int, longest: int) -> list[int]:
    """Piece lengths 1..longest summing to T."""
    rng, splits = np.random.default_rng(seed), []
    while T > 0:
        splits.append(min(T, int(rng.integers(1, longest + 1))))
        T -= splits[-1]
    return splits
