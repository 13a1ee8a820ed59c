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
