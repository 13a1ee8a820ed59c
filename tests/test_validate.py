"""common/validate.py: everything read from disk is checked before it is trusted (docs/FORMAT.md "Limits").

One test per failure class: each corrupt folder, header, index, tokenizer, quantization block, memory file
or task path gives a one-line CheckpointError (a ValueError) naming the file, and never a traceback, a
hang or a model that runs on garbage. Valid folders (both backends' saves, sharded, bf16, a retrofitted
folder, a quantized MLX folder) still load.
"""

from __future__ import annotations

import json
import os
import struct
import threading

import numpy as np
import pytest

from common import checkpoint as ckpt
from common import validate
from common.config import LIMITS, ModelConfig

torch = pytest.importorskip("torch")
import sleep_torch  # noqa: E402

SYMBOLS = list("0123456789abcdef")
TOKENIZER = {"type": "char", "symbols": SYMBOLS, "sep": ""}
CFG = ModelConfig.from_name("debug")


def _mlx():
    return pytest.importorskip("sleep_mlx")


def tiny(tmp_path, name="m", backend="torch", cfg=CFG, **save_kw):
    pkg = sleep_torch if backend == "torch" else _mlx()
    folder = tmp_path / name
    pkg.save(pkg.HybridLM(cfg, seed=0), folder, tokenizer=TOKENIZER, **save_kw)
    return folder


def read_file(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_file(path, header, body: bytes):
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


def edit_header(folder, fn, file=ckpt.WEIGHTS_FILE):
    header, body = read_file(folder / file)
    out = fn(header)
    write_file(folder / file, header if out is None else out, body)


def edit_config(folder, fn):
    doc = json.loads((folder / ckpt.CONFIG_FILE).read_text())
    fn(doc)
    (folder / ckpt.CONFIG_FILE).write_text(json.dumps(doc))


def refused(folder, match, loader=sleep_torch.load):
    with pytest.raises(ckpt.CheckpointError, match=match) as err:
        loader(folder)
    assert "\n" not in str(err.value)
    return str(err.value)


def entry(header, name="norm.weight"):
    return header[name]


# --- config.json ------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("sleep_passes", 10**9), ("n_layers", 10**8), ("window", 10**9),
                                         ("vocab_size", 10**9), ("d_model", 10**7), ("mlp_hidden", 10**9),
                                         ("n_heads", 10**6), ("conv_size", 10**6)])
def test_config_sizes_are_bounded(tmp_path, field, value):
    folder = tiny(tmp_path)
    edit_config(folder, lambda d: d["model"].__setitem__(field, value))
    message = refused(folder, f"{field}={value}: must be <= {LIMITS[field]}")
    assert "config.json" in message


@pytest.mark.parametrize("text", ['{"model": NaN}', "[" * 100000 + "]" * 100000, "\xff\xfe", "12" * 3000])
def test_config_json_that_is_not_plain_json(tmp_path, text):
    folder = tiny(tmp_path)
    (folder / ckpt.CONFIG_FILE).write_bytes(text.encode("latin-1"))
    refused(folder, "config.json")


def test_config_rope_theta_infinity_is_refused(tmp_path):
    folder = tiny(tmp_path)
    raw = (folder / ckpt.CONFIG_FILE).read_text().replace('"rope_theta": 10000.0', '"rope_theta": Infinity')
    (folder / ckpt.CONFIG_FILE).write_text(raw)
    refused(folder, "Infinity is not allowed")
    with pytest.raises(ValueError, match="rope_theta=inf"):
        CFG.replace(rope_theta=float("inf"))


def _in_thread(fn, timeout=10):
    """Run fn in a thread; fail (instead of hanging the suite) when it does not finish in time."""
    box = {}
    t = threading.Thread(target=lambda: box.update(result=_catch(fn)), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "hangs"
    return box["result"]


def _catch(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test inspects which exception
        return e
    return None


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "dir"])
@pytest.mark.parametrize("file", [ckpt.CONFIG_FILE, ckpt.WEIGHTS_FILE, "tokenizer.json"])
def test_special_files_are_never_opened(tmp_path, kind, file):
    folder = tiny(tmp_path)
    target = folder / file
    if target.exists():
        target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "dev-zero":
        target.symlink_to("/dev/zero")
    else:
        target.mkdir()
    err = _in_thread(lambda: sleep_torch.load(folder))
    assert isinstance(err, ckpt.CheckpointError) and "\n" not in str(err), err


def test_links_inside_the_folder_are_followed_and_links_out_refused(tmp_path):
    folder = tiny(tmp_path)
    (folder / ckpt.WEIGHTS_FILE).rename(folder / "real.safetensors")
    (folder / ckpt.WEIGHTS_FILE).symlink_to("real.safetensors")
    sleep_torch.load(folder)
    outside = tmp_path / "outside.safetensors"
    (folder / "real.safetensors").rename(outside)
    (folder / ckpt.WEIGHTS_FILE).unlink()
    (folder / ckpt.WEIGHTS_FILE).symlink_to(outside)
    refused(folder, "outside the model folder")


# --- safetensors headers -----------------------------------------------------------------------------

HEADERS = {
    "list": lambda h: b"[1, 2, 3]",
    "number": lambda h: b"42",
    "string-entry": lambda h: {**h, "norm.weight": "F32"},
    "missing-key": lambda h: {**h, "norm.weight": {"dtype": "F32", "shape": [32]}},
    "extra-key": lambda h: {**h, "norm.weight": {**h["norm.weight"], "x": 1}},
    "unknown-dtype": lambda h: {**h, "norm.weight": {**h["norm.weight"], "dtype": "F128"}},
    "shape-float": lambda h: {**h, "norm.weight": {**h["norm.weight"], "shape": [32.0]}},
    "shape-negative": lambda h: {**h, "norm.weight": {**h["norm.weight"], "shape": [-32]}},
    "shape-bool": lambda h: {**h, "norm.weight": {**h["norm.weight"], "shape": [True]}},
    "offsets-three": lambda h: {**h, "norm.weight": {**h["norm.weight"], "data_offsets": [0, 1, 2]}},
    "metadata-int": lambda h: {**h, "__metadata__": {"format": 1}},
    "bytes-vs-shape": lambda h: {**h, "norm.weight": {**h["norm.weight"], "shape": [16]}},
    "huge-length": None,
}


@pytest.mark.parametrize("how", HEADERS)
def test_malformed_headers(tmp_path, how):
    folder = tiny(tmp_path)
    if how == "huge-length":
        data = (folder / ckpt.WEIGHTS_FILE).read_bytes()
        (folder / ckpt.WEIGHTS_FILE).write_bytes(struct.pack("<Q", 2**63) + data[8:])
    else:
        edit_header(folder, HEADERS[how])
    refused(folder, "model.safetensors")


def _shift(header, name, delta_begin, delta_end):
    e = header[name]
    e["data_offsets"] = [e["data_offsets"][0] + delta_begin, e["data_offsets"][1] + delta_end]


@pytest.mark.parametrize("how,match", [
    ("negative", "expected 0 <= begin <= end"), ("overlap", "overlaps"), ("gap", "gap|bytes for shape"),
    ("short-data", "truncated"), ("trailing-data", "the file holds"),
])
def test_data_offsets_must_tile_the_data(tmp_path, how, match):
    folder = tiny(tmp_path)
    header, body = read_file(folder / ckpt.WEIGHTS_FILE)
    first = min((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])
    second = min((n for n in header if n not in ("__metadata__", first)), key=lambda n: header[n]["data_offsets"][0])
    if how == "negative":
        _shift(header, first, -8, -8)
    elif how == "overlap":
        _shift(header, second, -4, -4)
    elif how == "gap":
        _shift(header, second, 4, 4)
    elif how == "short-data":
        body = body[:-4]
    else:
        body = body + b"\0" * 4
    write_file(folder / ckpt.WEIGHTS_FILE, header, body)
    refused(folder, match)


def test_convert_refuses_negative_offsets(tmp_path):
    from convert.convert import convert_path

    folder = tiny(tmp_path)
    header, body = read_file(folder / ckpt.WEIGHTS_FILE)
    first = min((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])
    _shift(header, first, -64, -64)
    write_file(folder / ckpt.WEIGHTS_FILE, header, body)
    with pytest.raises(ckpt.CheckpointError, match="begin <= end"):
        convert_path(folder, tmp_path / "out", to="mlx")
    assert not (tmp_path / "out").exists()


# --- dtypes and values ----------------------------------------------------------------------------

def _retag(header, name, dtype):
    header[name]["dtype"] = dtype


@pytest.mark.parametrize("dtype", ["I32", "U32", "F64"])
def test_integer_or_f64_weights_are_refused(tmp_path, dtype):
    folder = tiny(tmp_path)
    if dtype == "F64":  # same bytes, twice as wide: halve the shape
        edit_header(folder, lambda h: h["norm.weight"].update(dtype="F64", shape=[16]))
        refused(folder, "norm.weight")
    else:
        edit_header(folder, lambda h: _retag(h, "norm.weight", dtype))
        refused(folder, f"norm.weight has dtype {dtype}")


def test_mixed_float_dtypes_are_refused(tmp_path):
    folder = tiny(tmp_path)
    header, body = read_file(folder / ckpt.WEIGHTS_FILE)
    names = sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])
    chunks = {n: body[header[n]["data_offsets"][0]:header[n]["data_offsets"][1]] for n in names}
    chunks["norm.weight"] = np.frombuffer(chunks["norm.weight"], np.float32).astype(np.float16).tobytes()
    header["norm.weight"]["dtype"] = "F16"
    offset, out = 0, b""
    for n in names:
        header[n]["data_offsets"] = [offset, offset + len(chunks[n])]
        offset += len(chunks[n])
        out += chunks[n]
    write_file(folder / ckpt.WEIGHTS_FILE, header, out)
    refused(folder, "one float dtype")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_weights_are_refused(tmp_path, dtype, value):
    model = sleep_torch.HybridLM(CFG, seed=0)
    with torch.no_grad():
        model.layers[1].ssm.q_proj.weight[3, 5] = float(value)
    sleep_torch.save(model, tmp_path / "m", tokenizer=TOKENIZER, dtype=dtype)
    refused(tmp_path / "m", "layers.1.ssm.q_proj.weight holds NaN or infinite values")
    refused(tmp_path / "m", "NaN or infinite", loader=_mlx().load)


# --- tokenizer and quantization blocks -------------------------------------------------------------

@pytest.mark.parametrize("block,match", [
    ({"type": "char", "symbols": SYMBOLS + ["x"], "sep": ""}, "17 tokens, more than the model's vocab_size=16"),
    ({"type": "byte"}, "258 tokens"),
    ({"type": "sentencepiece"}, "tokenizer.type"),
    ({"type": "hf", "file": "../tokenizer.json"}, "plain file name"),
    ({"type": "hf"}, "missing"),
    ({"type": "char", "symbols": "0123"}, "list of strings"),
])
def test_tokenizer_blocks(tmp_path, block, match):
    folder = tiny(tmp_path)
    edit_config(folder, lambda d: d.__setitem__("tokenizer", block))
    refused(folder, match)


@pytest.mark.parametrize("block,match", [
    ({"bits": 4, "group_size": 0, "layers": ["layers.0.mlp.up_proj"]}, "group_size=0"),
    ({"bits": 7, "group_size": 32, "layers": ["layers.0.mlp.up_proj"]}, "bits=7"),
    ({"bits": 4, "group_size": 32, "layers": []}, "layers"),
    ({"bits": 4, "group_size": 32, "layers": "layers.0.mlp.up_proj"}, "layers"),
    ([4, 32], "quantization must be an object"),
    ({"bits": 4, "group_size": 32, "layers": ["embed"]}, "unknown layer embed"),
])
def test_quantization_blocks(tmp_path, block, match):
    folder = tiny(tmp_path)
    edit_config(folder, lambda d: d.__setitem__("quantization", block))
    refused(folder, match, loader=lambda f: ckpt.validate_folder(f))


# --- shard indexes ---------------------------------------------------------------------------------

def _sharded(tmp_path):
    folder = tiny(tmp_path, shard_size=20_000)
    index = json.loads((folder / ckpt.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    return folder, index


@pytest.mark.parametrize("how,match", [
    ("dotdot", "plain file name"), ("absolute", "plain file name"), ("subdir", "plain file name"),
    ("not-a-dict", "corrupt shard index"), ("value-int", "expected a file name"),
    ("moved", "weight_map says"), ("unlisted", "not in its shard"), ("link-out", "outside the model folder"),
])
def test_shard_index(tmp_path, how, match):
    folder, index = _sharded(tmp_path)
    wm = index["weight_map"]
    first, shard = next(iter(wm.items()))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / shard).write_bytes((folder / shard).read_bytes())
    if how == "dotdot":
        wm[first] = f"../elsewhere/{shard}"
    elif how == "absolute":
        wm[first] = str(tmp_path / "elsewhere" / shard)
    elif how == "subdir":
        wm[first] = f"sub/{shard}"
    elif how == "not-a-dict":
        index["weight_map"] = list(wm)
    elif how == "value-int":
        wm[first] = 3
    elif how == "moved":
        wm[first] = next(s for s in wm.values() if s != shard)
    elif how == "unlisted":
        wm["layers.9.norm1.weight"] = shard
    elif how == "link-out":
        (folder / shard).unlink()
        (folder / shard).symlink_to(tmp_path / "elsewhere" / shard)
    (folder / ckpt.INDEX_FILE).write_text(json.dumps(index))
    refused(folder, match)


# --- memory files ----------------------------------------------------------------------------------

MEM_CFG = ModelConfig.from_name("debug", eviction="sliding", window=5)


@pytest.fixture(scope="module")
def memory_file(tmp_path_factory):
    model = sleep_torch.HybridLM(MEM_CFG, seed=3)
    tokens = torch.tensor(np.random.default_rng(0).integers(0, 16, (1, 12)))
    with torch.no_grad():
        _, state = model.step(tokens, model.new_state(1))
    path = tmp_path_factory.mktemp("mem") / "mem.safetensors"
    model.save_state(state, path)
    return model, path


def _rewrite_memory(path, out, *, meta=None, drop=None, add=None, replace=None):
    header, body = read_file(path)
    tensors = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        a, b = e["data_offsets"]
        tensors[name] = (e["dtype"], e["shape"], body[a:b])
    if drop:
        del tensors[drop]
    if add:
        tensors[add[0]] = add[1]
    if replace:
        tensors[replace[0]] = replace[1](*tensors[replace[0]])
    new, data = {"__metadata__": {**header["__metadata__"], **(meta or {})}}, b""
    for name, (dtype, shape, raw) in tensors.items():
        new[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    write_file(out, new, data)


def _nan_first(dtype, shape, raw):
    a = np.frombuffer(raw, np.float32).copy()
    a[0] = np.nan
    return dtype, shape, a.tobytes()


MEMORY = {
    "missing-conv": (dict(drop="conv.1"), "memory tensor conv.1 is missing"),
    "missing-state": (dict(drop="committed.1"), "committed.1 is missing"),
    "extra-tensor": (dict(add=("bonus.0", ("F32", [1], b"\0" * 4))), "unexpected memory tensor bonus.0"),
    "wrong-shape": (dict(replace=("running.1", lambda d, s, r: (d, [1, 2, 16, 8, 2], r))), "running.1 is F32"),
    "wrong-dtype": (dict(replace=("running.1", lambda d, s, r: ("I32", s, r))), "running.1 is I32"),
    "nan-state": (dict(replace=("committed.1", _nan_first)), "NaN or infinite"),
    "negative-counter": (dict(meta={"seen": "-5"}), "seen='-5' is not a non-negative integer"),
    "underscore-counter": (dict(meta={"seen": "1_0"}), "is not a non-negative integer"),
    "huge-due": (dict(meta={"due": str(10**9)}), "due=1000000000"),
    "due-mid-window": (dict(meta={"due": "2"}), "exactly when offset == window"),
    "offset-past-window": (dict(meta={"offset": "9"}), "offset=9"),
    "seen-below-offset": (dict(meta={"seen": "1"}), "seen=1"),
    "sleeps-above-seen": (dict(meta={"sleeps": "99"}), "sleeps=99"),
    "layers": (dict(meta={"n_layers": "3"}), "3 blocks"),
}


@pytest.mark.parametrize("how", MEMORY)
def test_memory_files(memory_file, tmp_path, how):
    model, path = memory_file
    changes, match = MEMORY[how]
    _rewrite_memory(path, tmp_path / "bad.safetensors", **changes)
    with pytest.raises(ckpt.CheckpointError, match=match) as err:
        model.load_state(tmp_path / "bad.safetensors")
    assert "\n" not in str(err.value)


def test_memory_files_mlx(memory_file, tmp_path):
    mlx = _mlx()
    model, path = memory_file
    other = mlx.HybridLM(MEM_CFG, seed=3)
    assert other.load_state(path).offset == 2  # the valid file loads across backends
    _rewrite_memory(path, tmp_path / "bad.safetensors", drop="conv.1")
    with pytest.raises(ckpt.CheckpointError, match="conv.1 is missing"):
        other.load_state(tmp_path / "bad.safetensors")


def test_memory_file_that_is_a_fifo(memory_file, tmp_path):
    model, _ = memory_file
    os.mkfifo(tmp_path / "fifo")
    err = _in_thread(lambda: model.load_state(tmp_path / "fifo"))
    assert isinstance(err, ckpt.CheckpointError), err


# --- task paths ------------------------------------------------------------------------------------

def test_task_paths_resolve_inside_the_model_folder(tmp_path, monkeypatch):
    from lmsleep.workflows import model_task

    folder = tiny(tmp_path, cfg=CFG.replace(vocab_size=258))
    (folder / "notes.txt").write_text("sleep well " * 50)
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours " * 50)
    task = {"name": "text", "params": {"path": "notes.txt", "seq_len": 16, "window": 8, "field": "text"}}
    edit_config(folder, lambda d: d.__setitem__("task", task))
    monkeypatch.chdir(tmp_path)  # the recorded relative path is the folder's, not the working directory's
    assert model_task(folder, None, {}).params["path"] == str((folder / "notes.txt").resolve())
    for bad in ("../secret.txt", str(secret), "/etc/passwd"):
        task["params"]["path"] = bad
        edit_config(folder, lambda d: d.__setitem__("task", task))
        with pytest.raises(ckpt.CheckpointError, match="outside the model folder"):
            model_task(folder, None, {})
    assert model_task(folder, None, {}, data=str(secret)).params["path"] == str(secret)  # the user's own choice
    assert model_task(folder, None, {"path": str(secret)}).params["path"] == str(secret)


def test_recorded_task_sizes_are_bounded(tmp_path):
    from lmsleep.workflows import model_task

    folder = tiny(tmp_path)
    edit_config(folder, lambda d: d.__setitem__("task", {"name": "rule110", "params": {"steps": 10**9}}))
    with pytest.raises(ValueError, match="steps must be in"):
        model_task(folder, None, {})
    edit_config(folder, lambda d: d.__setitem__("task", {"name": "rule110", "params": {"width": 10**6, "states": 999}}))
    with pytest.raises(ValueError, match="tokens"):
        model_task(folder, None, {})


# --- valid folders still load ----------------------------------------------------------------------

@pytest.mark.parametrize("writer", ["torch", "mlx"])
@pytest.mark.parametrize("kw", [{}, {"shard_size": 20_000}, {"dtype": "bfloat16"}], ids=["plain", "sharded", "bf16"])
def test_valid_folders_load_in_both_backends(tmp_path, writer, kw):
    folder = tiny(tmp_path, backend=writer, **kw)
    config, _, _, dtype = ckpt.check_folder(folder)
    assert config == CFG and dtype == ("BF16" if kw.get("dtype") else "F32")
    assert sleep_torch.load(folder).tokenizer.vocab_size == 16
    assert _mlx().load(folder).tokenizer.vocab_size == 16


def test_quantized_mlx_folder_loads(tmp_path):
    _mlx()
    from convert.convert import convert_path

    folder = tiny(tmp_path, cfg=CFG.replace(d_model=64, head_dim=32, ssm_head_dim=32))
    convert_path(folder, tmp_path / "q", to="mlx", quantize_bits=4, group_size=32)
    model = _mlx().load(tmp_path / "q")
    assert model.config.d_model == 64


def test_retrofitted_folder_loads(tmp_path):
    pytest.importorskip("transformers")
    from convert.retrofit import retrofit
    from tests.retrofit.conftest import hf_model

    hf_model("llama").save_pretrained(tmp_path / "src")
    retrofit(tmp_path / "src", tmp_path / "out", window=8, insert=1)
    ckpt.validate_folder(tmp_path / "out")
    assert sleep_torch.load(tmp_path / "out").config.window == 8
    assert _mlx().load(tmp_path / "out").config.window == 8


def test_header_reader_is_the_only_one():
    import convert.hf

    assert not hasattr(convert.hf, "read_safetensors_header")
    assert ckpt.read_safetensors is validate.read_safetensors
