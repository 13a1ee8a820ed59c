"""sleep_torch.save / load: the model folder of SPEC section 5, validation, atomic writes."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common import checkpoint as ckpt
from common.config import ModelConfig
from sleep_torch import HybridLM, load, save
from tests.conftest import assert_close


@pytest.fixture
def model():
    return HybridLM(ModelConfig.from_name("debug", tie_embeddings=False, n_layers=3), seed=3)


def test_names_and_shapes_are_canonical(model):
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert params == ckpt.param_shapes(model.config)


@pytest.mark.parametrize("shard_size", [None, 4096], ids=["single", "sharded"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip(model, tmp_path, shard_size, dtype):
    save(model, tmp_path / "m", dtype=dtype, shard_size=shard_size)
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert ("model.safetensors.index.json" in files) == (shard_size is not None)
    meta = ckpt.read_metadata(ckpt.weight_files(tmp_path / "m")[0])
    assert meta == {"format": "lm-sleep", "backend": "torch"}
    again = load(tmp_path / "m")
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        assert q.dtype == getattr(torch, dtype)
        assert torch.equal(p.to(q.dtype), q), name
    x = torch.randint(0, 16, (1, 20))
    if dtype == "float32":
        assert_close("logits after round trip", model(x), again(x), atol=0, rtol=0)


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
    elif how == "not-json":
        (folder / "config.json").write_text("{oops")
    else:
        tensors = load_file(str(f))
        if how == "missing":
            del tensors["norm.weight"]
        elif how == "extra":
            tensors["bonus.weight"] = torch.zeros(2)
        elif how == "shape":
            tensors["norm.weight"] = torch.zeros(5)
        save_file(tensors, str(f))


BAD = {"truncated": "truncated", "version": "format_version 99", "not-json": "not valid JSON",
       "missing": "missing tensor norm.weight", "extra": "unexpected tensor bonus.weight",
       "shape": r"norm.weight has shape \[5\]"}


@pytest.mark.parametrize("how", BAD, ids=list(BAD))
def test_bad_folders_give_one_line_errors(model, tmp_path, how):
    save(model, tmp_path / "m")
    _corrupt(tmp_path / "m", how)
    snapshot = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    with pytest.raises(ckpt.CheckpointError, match=BAD[how]) as err:
        load(tmp_path / "m")
    assert "\n" not in str(err.value)
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == snapshot


def test_missing_folder(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="not a model folder"):
        load(tmp_path / "nowhere")
