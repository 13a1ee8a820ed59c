"""Memory files: save_state/load_state continue bit-exactly, refuse other models, cross backends."""

import numpy as np
import pytest

from common.checkpoint import CheckpointError
from common.config import ModelConfig

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")
import sleep_mlx  # noqa: E402
import sleep_torch  # noqa: E402

CFG = ModelConfig.from_name("debug", eviction="sliding", window=5, sleep_passes=2)
TOKENS = np.random.default_rng(0).integers(0, 16, (2, 23))
BACKENDS = {"torch": (sleep_torch, lambda a: torch.tensor(a)), "mlx": (sleep_mlx, lambda a: mx.array(a))}


def _np(x):
    return x.numpy() if hasattr(x, "numpy") and not isinstance(x, mx.array) else np.array(x)


@pytest.mark.parametrize("writer", BACKENDS)
@pytest.mark.parametrize("reader", BACKENDS)
@pytest.mark.parametrize("cut", [5, 12], ids=["sleep-due", "mid-window"])
def test_reloaded_state_continues_exactly(tmp_path, writer, reader, cut):
    (wpkg, wconv), (rpkg, rconv) = BACKENDS[writer], BACKENDS[reader]
    wmodel, rmodel = wpkg.HybridLM(CFG, seed=3), rpkg.HybridLM(CFG, seed=3)
    with torch.no_grad():
        _, state = wmodel.step(wconv(TOKENS[:, :cut]), wmodel.new_state(2))
        wmodel.save_state(state, tmp_path / "mem.safetensors")
        original, _ = rmodel.step(rconv(TOKENS[:, cut:]), rmodel.step(rconv(TOKENS[:, :cut]), rmodel.new_state(2))[1])
        loaded = rmodel.load_state(tmp_path / "mem.safetensors")
        assert (loaded.seen, loaded.offset, loaded.due, loaded.sleeps) == (state.seen, state.offset, state.due, state.sleeps)
        resumed, _ = rmodel.step(rconv(TOKENS[:, cut:]), loaded)
    if writer == reader:
        assert np.array_equal(_np(original), _np(resumed))  # bit-exact
    else:
        assert np.abs(_np(original) - _np(resumed)).max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_of_another_model_is_refused(tmp_path, backend):
    pkg, conv = BACKENDS[backend]
    model = pkg.HybridLM(CFG, seed=3)
    _, state = model.step(conv(TOKENS[:, :7]), model.new_state(2))
    model.save_state(state, tmp_path / "mem.safetensors")
    with pytest.raises(CheckpointError, match="another model"):
        pkg.HybridLM(CFG, seed=4).load_state(tmp_path / "mem.safetensors")
    with pytest.raises(CheckpointError, match="another model"):
        pkg.HybridLM(CFG.replace(sleep_passes=3), seed=3).load_state(tmp_path / "mem.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(CheckpointError, match="not a readable memory file"):
        model.load_state(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_file_of_the_previous_release_still_loads(backend):
    """tests/data/memory_v1.safetensors was written by the release before per-block caches
    (State as seven per-field lists, commit d393718): it loads and continues to the logits that
    release computed."""
    import json
    from pathlib import Path

    data = Path(__file__).parent / "data"
    doc = json.loads((data / "memory_v1.json").read_text())
    pkg, conv = BACKENDS[backend]
    model = pkg.HybridLM(ModelConfig.from_dict(doc["config"]), seed=doc["seed"])
    state = model.load_state(data / "memory_v1.safetensors")
    tokens = np.array(doc["tokens"])
    assert (state.seen, state.offset) == (doc["cut"], doc["cut"] % model.config.window)
    with torch.no_grad():
        logits, _ = model.step(conv(tokens[:, doc["cut"]:]), state)
    expected = np.load(data / "memory_v1_next_logits.npy")
    assert np.abs(_np(logits) - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_cache_lengths_are_exact(backend, eviction):
    """SPEC section 3 bound, checked exactly: attention keeps L (hard) or the previous window's
    last L-1 plus the current window's keys (sliding); hidden holds the current window only."""
    pkg, conv = BACKENDS[backend]
    cfg = CFG.replace(eviction=eviction)
    L = cfg.window
    model = pkg.HybridLM(cfg, seed=3)
    state = model.new_state(2)
    with torch.no_grad():
        for t in range(3 * L + 2):
            model.step(conv(TOKENS[:, t % 23:t % 23 + 1]), state)
            full = state.offset  # tokens of the current window woken so far
            kept = min(L - 1, t + 1 - full) if eviction == "sliding" and state.sleeps else 0
            for cache, kind in zip(state.caches, cfg.layer_types):
                if kind == "A":
                    assert (cache.past_k.shape[1], cache.cur_k.shape[1]) == (kept, full), (t, kind)
                    assert (cache.past_v.shape[1], cache.cur_v.shape[1]) == (kept, full)
                else:
                    assert cache.committed.shape == cache.running.shape == (2, cfg.ssm_heads, cfg.ssm_v_dim,
                                                                            cfg.ssm_head_dim)
            assert state.hidden.shape[1] == full


@pytest.mark.parametrize("backend", BACKENDS)
def test_fingerprint_is_remembered_until_weights_or_config_change(backend, monkeypatch):
    from common import memory

    pkg, _ = BACKENDS[backend]
    model = pkg.HybridLM(CFG, seed=3)
    calls = []
    real = memory.fingerprint
    monkeypatch.setattr(memory, "fingerprint", lambda *a: calls.append(1) or real(*a))
    first = model.fingerprint()
    assert model.fingerprint() == first and len(calls) == 1  # remembered
    if backend == "torch":
        with torch.no_grad():
            model.embed.weight[0, 0] += 1.0  # in place: the version counter moves
    else:
        model.embed.weight = model.embed.weight + 1.0  # MLX: an update is a new array
    changed = model.fingerprint()
    assert len(calls) == 2 and changed != first
    model.config = model.config.replace(sleep_passes=3)
    assert model.fingerprint() != changed and len(calls) == 3
