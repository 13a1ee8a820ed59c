"""sleep_mlx.save / load: the model folder of SPEC section 5, validation, atomic writes."""

import json
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from mlx.utils import tree_flatten  # noqa: E402

from common import checkpoint as ckpt  # noqa: E402
from common.config import ModelConfig  # noqa: E402
from sleep_mlx import HybridLM, load, save  # noqa: E402
from tests.conftest import assert_close  # noqa: E402


@pytest.fixture
def model():
    return HybridLM(ModelConfig.from_name("debug", tie_embeddings=False, n_layers=3), seed=3)


def params(model):
    return dict(tree_flatten(model.parameters()))


@pytest.mark.parametrize("shard_size", [None, 4096], ids=["single", "sharded"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip(model, tmp_path, shard_size, dtype):
    save(model, tmp_path / "m", dtype=dtype, shard_size=shard_size)
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert ("model.safetensors.index.json" in files) == (shard_size is not None)
    assert not any(f.startswith(".") for f in files)
    meta = ckpt.read_metadata(ckpt.weight_files(tmp_path / "m")[0])
    assert meta == {"format": "lm-sleep", "backend": "mlx"}
    again = load(tmp_path / "m")
    assert again.config == model.config
    loaded = params(again)
    for name, p in params(model).items():
        q = loaded[name]
        assert q.dtype == getattr(mx, dtype), name
        assert mx.array_equal(p.astype(q.dtype), q).item(), name
    x = mx.array(np.random.default_rng(0).integers(0, 16, (1, 20)), dtype=mx.int32)
    if dtype == "float32":
        assert_close("logits after round trip", model(x), again(x), atol=0, rtol=0)
    else:
        assert again(x).dtype == mx.bfloat16
        up = load(tmp_path / "m", dtype="float32")  # widen on load
        assert up.embed.weight.dtype == mx.float32


def test_refuses_to_overwrite(model, tmp_path):
    save(model, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    with pytest.raises(ckpt.CheckpointError, match="already exists"):
        save(HybridLM(model.config, seed=9), tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    save(HybridLM(model.config, seed=9), tmp_path / "m", overwrite=True)
    assert (tmp_path / "m" / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary leftovers


def _corrupt(folder: Path, how: str):
    f = folder / "model.safetensors"
    if how == "truncated":
        f.write_bytes(f.read_bytes()[:-100])
    elif how == "version":
        doc = json.loads((folder / "config.json").read_text())
        doc["format_version"] = 99
        (folder / "config.json").write_text(json.dumps(doc))
    elif how == "quantized":
        doc = json.loads((folder / "config.json").read_text())
        doc["quantization"] = {"bits": 4, "group_size": 32, "layers": ["layers.0.attn.nope"]}
        (folder / "config.json").write_text(json.dumps(doc))
    else:
        tensors = mx.load(str(f))
        if how == "missing":
            del tensors["norm.weight"]
        elif how == "extra":
            tensors["bonus.weight"] = mx.zeros((2,))
        elif how == "shape":
            tensors["norm.weight"] = mx.zeros((5,))
        mx.save_safetensors(str(f), tensors)


BAD = {"truncated": "truncated", "version": "format_version 99", "missing": "missing tensor norm.weight",
       "extra": "unexpected tensor bonus.weight", "shape": r"norm.weight has shape \[5\]",
       "quantized": "quantization lists unknown layer layers.0.attn.nope"}


@pytest.mark.parametrize("how", BAD, ids=list(BAD))
def test_bad_folders_give_one_line_errors(model, tmp_path, how):
    save(model, tmp_path / "m")
    _corrupt(tmp_path / "m", how)
    snapshot = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    with pytest.raises(ckpt.CheckpointError, match=BAD[how]) as err:
        load(tmp_path / "m")
    assert "\n" not in str(err.value)
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == snapshot


def test_missing_folder_and_bad_dtype(model, tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="not a model folder"):
        load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="dtype must be one of"):
        save(model, tmp_path / "m", dtype="int8")
