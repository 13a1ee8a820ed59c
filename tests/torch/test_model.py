"""HybridLM (torch): streaming == forward, sleep semantics, bounded State, Algorithm 1 re-derived."""

import math

import pytest
import torch
import torch.nn.functional as F

from common.config import ModelConfig
from sleep_torch import HybridLM
from tests.conftest import assert_close

torch.set_num_threads(2)


def make_model(seed=0, **overrides):
    base = dict(vocab_size=16, d_model=32, n_layers=4, pattern="AS", n_heads=2, head_dim=16, ssm_heads=2,
                ssm_head_dim=8, ssm_value_dim=16, mlp_hidden=48, window=6, sleep_passes=3)
    cfg = ModelConfig.from_dict({**base, **overrides})
    return HybridLM(cfg, seed=seed).eval()


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
    return torch.cat(outs, 1), state


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("T", [23, 24], ids=["mid-window", "window-end"])
def test_streaming_equals_forward(case, T):
    model = make_model(**CASES[case])
    tokens = torch.randint(0, 16, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        one, _ = stream(model, tokens, [1] * T)
        rng = torch.Generator().manual_seed(T)
        splits, left = [], T
        while left:
            n = min(left, int(torch.randint(1, 9, (1,), generator=rng)))
            splits.append(n)
            left -= n
        rand, _ = stream(model, tokens, splits)
    assert_close("one token at a time", full, one, atol=1e-5, rtol=0)
    assert_close(f"splits {splits}", full, rand, atol=1e-5, rtol=0)


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_sleep_changes_only_later_windows(eviction):
    model = make_model(eviction=eviction)
    tokens = torch.randint(0, 16, (2, 20), generator=torch.Generator().manual_seed(2))
    L = model.config.window
    with torch.no_grad():
        n1, n3 = model(tokens, passes=1), model(tokens, passes=3)
    assert_close("first window, N=1 vs N=3", n1[:, :L], n3[:, :L], atol=0, rtol=0)
    assert (n1[:, L:] - n3[:, L:]).abs().max() > 1e-3, "sleep passes had no effect on later windows"


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_early_sleep_equals_lazy_sleep(eviction):
    model = make_model(eviction=eviction)
    L = model.config.window
    tokens = torch.randint(0, 16, (1, 2 * L + 3), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        lazy, lazy_state = stream(model, tokens, [L, L + 3])
        state = model.new_state(1)
        first, state = model.step(tokens[:, :L], state)
        assert state.due == 3 and state.sleeps == 0
        model.sleep(state)  # what a chat runs between turns
        assert state.due == 0 and state.sleeps == 1 and state.offset == 0
        second, state = model.step(tokens[:, L:], state)
    assert_close("early vs lazy sleep", lazy, torch.cat([first, second], 1), atol=0, rtol=0)
    for a, b in zip(lazy_state.tensors(), state.tensors()):
        assert torch.equal(a, b)


def test_due_sleep_uses_passes_of_the_call_that_filled_the_window():
    model = make_model(sleep_passes=1)
    L = model.config.window
    tokens = torch.randint(0, 16, (1, L + 4), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(tokens, passes=3)
        state = model.new_state(1)
        a, state = model.step(tokens[:, :L], state, passes=3)  # fills the window: sleep due with N=3
        b, state = model.step(tokens[:, L:], state)  # default passes (1) for this call
    assert_close("due sleep keeps its passes", expected, torch.cat([a, b], 1), atol=1e-6, rtol=0)


def test_forced_sleep_starts_a_new_window():
    model = make_model()
    tokens = torch.randint(0, 16, (1, 4), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
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
    with torch.no_grad():
        for w in range(1, 21):
            _, state = model.step(torch.randint(0, 16, (2, L)), state)
            sizes[w] = (len(state.tensors()), state.nbytes())
    assert state.sleeps == 19  # the 20th window's sleep is due, not yet run
    assert sizes[20] == sizes[2], f"state grew: {sizes[2]} -> {sizes[20]}"


def test_token_errors():
    model = make_model()
    state = model.new_state(1)
    with pytest.raises(ValueError, match="token id 16 out of range"):
        model.step(torch.tensor([[1, 16]]), state)
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="integer tensor"):
        model.step(torch.zeros(1, 3), state)
    with pytest.raises(ValueError, match="batch size"):
        model.step(torch.zeros(2, 3, dtype=torch.long), state)
    with pytest.raises(ValueError, match="passes"):
        model(torch.zeros(1, 3, dtype=torch.long), passes=0)


def test_window_checkpointing_gives_same_loss_and_grads():
    model = make_model(sleep_passes=2).train()
    tokens = torch.randint(0, 16, (2, 20), generator=torch.Generator().manual_seed(6))
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.checkpoint_windows = flag
        loss = F.cross_entropy(model(tokens)[:, :-1].reshape(-1, 16), tokens[:, 1:].reshape(-1))
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert_close("loss", grads[0][0], grads[1][0], atol=1e-6, rtol=0)
    for name in grads[0][1]:
        assert_close(name, grads[0][1][name], grads[1][1][name], atol=1e-6, rtol=1e-5)


def test_scan_impls_agree_in_the_model():
    model = make_model(eviction="sliding")
    tokens = torch.randint(0, 16, (2, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        model.set_scan_impl("ref")
        ref = model(tokens)
        model.set_scan_impl("chunk")
        chunk = model(tokens)
    assert_close("chunk vs ref scan inside the model", ref, chunk, atol=1e-5, rtol=0)


def test_same_seed_same_weights_different_seed_different():
    a, b, c = make_model(seed=1), make_model(seed=1), make_model(seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.embed.weight, c.embed.weight)


# --- (d) Algorithm 1, re-derived independently from the model's submodules -----------------------

def _rope(x, theta):
    T, D = x.shape[1], x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cos(ang).repeat(1, 2)[None, :, None].float(), torch.sin(ang).repeat(1, 2)[None, :, None].float()
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _attention(attn, x, cfg):
    B, T, _ = x.shape
    H, D = cfg.n_heads, cfg.head_dim
    q = _rope(attn.q_proj(x).view(B, T, H, D), cfg.rope_theta)
    k = _rope(attn.k_proj(x).view(B, T, H, D), cfg.rope_theta)
    v = attn.v_proj(x).view(B, T, H, D)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, H * D)
    return attn.o_proj(out)


def _ssm(ssm, x, S, cfg):
    B, T, _ = x.shape
    H, Dk, Dv, K = cfg.ssm_heads, cfg.ssm_head_dim, cfg.ssm_v_dim, cfg.conv_size

    def conv(y, w):  # causal depthwise Conv1d with left padding K-1
        return F.silu(F.conv1d(F.pad(y.transpose(1, 2), (K - 1, 0)), w[:, None, :], groups=w.shape[0]).transpose(1, 2))

    q, k, v = conv(ssm.q_proj(x), ssm.q_conv.weight), conv(ssm.k_proj(x), ssm.k_conv.weight), conv(ssm.v_proj(x), ssm.v_conv.weight)
    q, k = q.view(B, T, H, Dk), k.view(B, T, H, Dk)
    q, k = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6), k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    v = v.view(B, T, H, Dv)
    beta = torch.sigmoid(ssm.b_proj(x))
    a = torch.exp(-torch.exp(ssm.A_log) * F.softplus(ssm.a_proj(x) + ssm.dt_bias))
    outs = []
    for t in range(T):  # S_t = a_t S_{t-1} (I - b k k^T) + b v k^T, o_t = S_t q_t / sqrt(Dk)
        kt, vt, bt, at = k[:, t], v[:, t], beta[:, t, :, None, None], a[:, t, :, None, None]
        S = at * (S - bt * torch.einsum("bhv,bhk->bhvk", torch.einsum("bhvk,bhk->bhv", S, kt), kt))
        S = S + bt * torch.einsum("bhv,bhk->bhvk", vt, kt)
        outs.append(torch.einsum("bhvk,bhk->bhv", S, q[:, t]) / math.sqrt(Dk))
    o = _rms(torch.stack(outs, 1), ssm.o_norm.weight, cfg.norm_eps)
    return ssm.o_proj(o.reshape(B, T, H * Dv) * F.silu(ssm.g_proj(x))), S


def algorithm1(model, tokens, n_context_windows, passes):
    """Paper Algorithm 1 (hard eviction): sleep N times on context chunks, predict on the last."""
    cfg, L = model.config, model.config.window
    states = {i: torch.zeros(tokens.shape[0], cfg.ssm_heads, cfg.ssm_v_dim, cfg.ssm_head_dim)
              for i, b in enumerate(model.layers) if b.kind == "S"}

    def blocks(h):
        for i, b in enumerate(model.layers):
            x = _rms(h, b.norm1.weight, cfg.norm_eps)
            if b.kind == "A":
                h = h + _attention(b.attn, x, cfg)
            else:
                out, states[i] = _ssm(b.ssm, x, states[i], cfg)
                h = h + out
            x = _rms(h, b.norm2.weight, cfg.norm_eps)
            h = h + b.mlp.down_proj(F.silu(b.mlp.gate_proj(x)) * b.mlp.up_proj(x))
        return h

    for w in range(n_context_windows):
        h = model.embed(tokens[:, w * L:(w + 1) * L])
        for _ in range(passes):
            h = blocks(h)
    h = blocks(model.embed(tokens[:, n_context_windows * L:]))
    return _rms(h, model.norm.weight, cfg.norm_eps) @ model.embed.weight.t()


@pytest.mark.parametrize("passes", [1, 2, 4])
def test_forward_matches_algorithm1_on_paper_format(passes):
    model = make_model(sleep_passes=passes, n_layers=4)
    L = model.config.window
    tokens = torch.randint(0, 16, (3, 3 * L + 4), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ours = model(tokens)[:, 3 * L:]  # the prediction window's logits
        theirs = algorithm1(model, tokens, 3, passes)
    assert_close(f"Algorithm 1, N={passes}", theirs, ours, atol=2e-5, rtol=0)

