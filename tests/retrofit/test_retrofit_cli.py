"""`lmsleep retrofit` from the command line: bad sources and bad flags end in one line on stderr and exit code 2,
with nothing written (OUT is not created, no temporary folder is left beside it); good ones write a folder that
loads in the chosen backend."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
from click.testing import CliRunner  # noqa: E402

from lmsleep.cli import cli  # noqa: E402
from tests.retrofit.conftest import CHATML, hf_model, write_tiny_gguf  # noqa: E402


def run(*args):
    return CliRunner().invoke(cli, ["retrofit", *[str(a) for a in args]])


def assert_refused(result, out, match: str):
    """Exit code 2, one error line naming the problem, no traceback, and nothing beside OUT."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert_one_error_line(result.stderr, match)
    assert not out.exists() and not list(out.parent.iterdir()), sorted(p.name for p in out.parent.iterdir())


def assert_one_error_line(stderr: str, match: str):
    """stderr = the progress lines said before the failure ("reading SRC"), then one "Error: ..." line."""
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith("Error: ") and match in lines[-1], stderr
    assert all(line.startswith(("reading ", "writing ")) for line in lines[:-1]), stderr


@pytest.fixture
def out(tmp_path):
    """OUT inside a folder of its own, so that any leftover temporary beside it is seen."""
    parent = tmp_path / "outs"
    parent.mkdir()
    return parent / "model"


@pytest.fixture
def tiny_folder(make_hf_folder, tiny_bpe):
    """A 2-layer random Llama saved with save_pretrained, plus the tiny BPE's tokenizer.json and a chat template."""
    text, _, _ = tiny_bpe
    _, folder = make_hf_folder("llama")
    (folder / "tokenizer.json").write_text(text)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "chat_template": CHATML}))
    return folder


# ---------------------------------------------------------------- bad sources

def test_pickle_weights_only(tmp_path, out):
    folder = tmp_path / "bin"
    folder.mkdir()
    hf_model("llama").config.to_json_file(folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    assert_refused(run(folder, out), out, "pytorch_model.bin found: pickle weights are not loaded")


def test_unsupported_model_type(make_hf_folder, out):
    _, folder = make_hf_folder("llama")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, model_type="gpt_neox")))
    assert_refused(run(folder, out), out, "model_type='gpt_neox': not a supported architecture")


def test_mismatched_shard_index(make_hf_folder, out):
    _, folder = make_hf_folder("llama", max_shard_size="100KB")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    name = next(n for n, s in index["weight_map"].items() if s == shards[0])
    index["weight_map"][name] = shards[1]  # the index says shard 2, the tensor lies in shard 1
    index_path.write_text(json.dumps(index))
    assert_refused(run(folder, out), out, f"tensor {name!r} lies in {shards[0]!r} but weight_map says")


def test_truncated_gguf(tiny_gguf, out):
    _, path = tiny_gguf
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    assert_refused(run(path, out), out, "truncated")


def test_gguf_of_another_architecture(tmp_path, tiny_bpe, out):
    _, tokens, merges = tiny_bpe
    path = write_tiny_gguf(tmp_path / "qwen.gguf", hf_model("llama", vocab_size=len(tokens)), tokens, merges,
                           architecture="qwen2")
    assert_refused(run(path, out), out, "general.architecture='qwen2': only 'llama' GGUF files are read")


def test_not_a_source(tmp_path, out):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    assert_refused(run(tmp_path / "weights.safetensors", out), out, "a source file must be a .gguf")


# ---------------------------------------------------------------- bad flags and an existing OUT

@pytest.mark.parametrize("flags, match", [
    (["--loop", "2:1"], "--loop '2:1': needs 0 <= a < b <= 2"),
    (["--loop", "middle"], "--loop 'middle': expected 'a:b'"),
    (["--insert-at", "3"], "--insert-at [3]: needs distinct source layer indices in [0, 2]"),
    (["--insert-at", "1,1"], "--insert-at [1, 1]: needs distinct"),
    (["--insert", "1", "--insert-at", "1"], "not both"),
    (["--insert", "2", "--loop", "0:1"], "--insert 2: must be between 0 and the 1 looped source layers"),
    (["--init", "copy-attn", "--ssm-heads", "2"], "--init copy-attn needs --ssm-heads 4 --ssm-head-dim 16"),
], ids=["loop-reversed", "loop-word", "insert-at-beyond", "insert-at-twice", "insert-and-insert-at",
        "insert-more-than-looped", "copy-attn-shape"])
def test_bad_flags(tiny_folder, out, flags, match):
    assert_refused(run(tiny_folder, out, *flags), out, match)


@pytest.mark.parametrize("flags, match", [
    (["--insert-at", "one,two"], "'one,two': expected comma-separated source layer indices"),
    (["--window", "0"], "--window"),
], ids=["insert-at-not-numbers", "window-zero"])
def test_flags_click_refuses(tiny_folder, out, flags, match):
    """Refused by click's own parameter checks: exit code 2, nothing written, the error on its last stderr line
    (click prints its usage lines above it)."""
    result = run(tiny_folder, out, *flags)
    assert result.exit_code == 2, result.output
    assert match in result.stderr.strip().splitlines()[-1], result.stderr
    assert not out.exists() and not list(out.parent.iterdir())


def test_existing_out_without_force(tiny_folder, out):
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run(tiny_folder, out, "--window", "16")
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.stderr, "exists (pass --force to replace it)")
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------- good ones

@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_retrofit_cli_writes_a_folder_that_loads(tiny_folder, out, backend):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    result = run(tiny_folder, out, "--window", "16", "--passes", "2", "--insert", "1", "--backend", backend)
    assert result.exit_code == 0, result.output
    assert f"-> {out}: 3 blocks (1 SSM inserted at [1])" in result.stdout
    assert f"loaded in {backend}: 3 blocks, tokenizer HFTokenizer; chat with: lmsleep chat {out}" in result.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]  # no temporaries left beside it
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                               "chat_template.jinja"}
    doc = json.loads((out / "config.json").read_text())
    assert doc["model"]["window"] == 16 and doc["model"]["sleep_passes"] == 2 and doc["model"]["pattern"] == "ASA"
    assert (out / "chat_template.jinja").read_text() == CHATML


def test_force_replaces_out(tiny_folder, out):
    out.mkdir()
    (out / "old.txt").write_text("old")
    result = run(tiny_folder, out, "--window", "16", "--insert-at", "0,2", "--loop", "all", "--force",
                 "--backend", "torch")
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists() and sorted(p.name for p in out.parent.iterdir()) == ["model"]
    assert json.loads((out / "config.json").read_text())["retrofit"]["source_layers"] == [None, 0, 1, None]
