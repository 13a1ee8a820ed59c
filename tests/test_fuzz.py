"""Fuzzing the readers with hypothesis: mutated safetensors headers (bytes and JSON), config.json values and
memory files of a tiny debug model. Every input either loads or raises CheckpointError / ValueError with a
one-line message -- never another exception -- within a time bound per example and without the process
growing by more than 500 MB. Deterministic (derandomize, no example database); the file runs in seconds.
"""

from __future__ import annotations

import json
import resource
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from common import checkpoint as ckpt  # noqa: E402
from common.config import ModelConfig  # noqa: E402

torch = pytest.importorskip("torch")
import sleep_torch  # noqa: E402

CFG = ModelConfig.from_name("debug", eviction="sliding", window=5)
TOKENIZER = {"type": "char", "symbols": list("0123456789abcdef"), "sep": ""}
FUZZ = settings(max_examples=60, deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
MAX_GROWTH_KB = 500 * 1024  # ru_maxrss is in KiB on Linux


class Base:
    """One saved folder and one memory file, made once; each example works on a fresh copy."""

    root = Path(tempfile.mkdtemp(prefix="lmsleep-fuzz-"))
    model = sleep_torch.HybridLM(CFG, seed=0)
    folder = root / "model"
    sleep_torch.save(model, folder, tokenizer=TOKENIZER)
    memory = root / "mem.safetensors"
    with torch.no_grad():
        _, state = model.step(torch.tensor(np.random.default_rng(0).integers(0, 16, (1, 7))), model.new_state(1))
    model.save_state(state, memory)
    weights = (folder / ckpt.WEIGHTS_FILE).read_bytes()
    config = json.loads((folder / ckpt.CONFIG_FILE).read_text())
    memory_bytes = memory.read_bytes()


@pytest.fixture(scope="module", autouse=True)
def _cleanup_and_memory_bound():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    shutil.rmtree(Base.root, ignore_errors=True)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < MAX_GROWTH_KB, f"the readers grew the process by {grown / 1024:.0f} MiB"


def fresh(tmp: Path, weights: bytes | None = None, config: dict | str | None = None) -> Path:
    folder = tmp / f"case{len(list(tmp.iterdir()))}"
    folder.mkdir()
    (folder / ckpt.WEIGHTS_FILE).write_bytes(Base.weights if weights is None else weights)
    doc = Base.config if config is None else config
    (folder / ckpt.CONFIG_FILE).write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return folder


def loads_or_clean_error(fn):
    """fn() succeeds, or raises a ValueError (CheckpointError included) with a one-line message."""
    try:
        return fn()
    except ValueError as e:
        assert "\n" not in str(e) and str(e), repr(e)
        return None


def split(data: bytes) -> tuple[bytes, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return data[8:8 + n], data[8 + n:]


def join(header: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + body


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                    | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
                    max_leaves=8)


@pytest.fixture
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, len(Base.weights))))
def test_header_bytes(tmp, edits, cut):
    data = bytearray(Base.weights)
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    for pos, value in edits:
        data[pos % header_end] = value  # the length prefix and the JSON text
    data = bytes(data[:cut]) if cut is not None else bytes(data)
    folder = fresh(tmp, weights=data)
    loads_or_clean_error(lambda: sleep_torch.load(folder))


FIELDS = ("dtype", "shape", "data_offsets")


@FUZZ
@given(which=st.integers(0, 10**6), key=st.sampled_from(FIELDS + ("__new__", "__drop__", "__whole__")),
       value=JSON)
def test_header_json(tmp, which, key, value):
    header_text, body = split(Base.weights)
    header = json.loads(header_text)
    names = sorted(n for n in header if n != "__metadata__")
    name = names[which % len(names)]
    if key == "__drop__":
        del header[name]
    elif key == "__whole__":
        header[name] = value
    elif key == "__new__":
        header[f"extra{which}"] = value
    else:
        header[name][key] = value
    folder = fresh(tmp, weights=join(json.dumps(header).encode(), body))
    loads_or_clean_error(lambda: sleep_torch.load(folder))


MODEL_FIELDS = sorted(Base.config["model"])


@FUZZ
@given(field=st.sampled_from(MODEL_FIELDS + ["__top__"]),
       value=st.one_of(JSON, st.integers(-10, 10**12), st.sampled_from([0, 1, 2, 3, 64, 2**31, 10**9])))
def test_config_values(tmp, field, value):
    doc = json.loads(json.dumps(Base.config))
    if field == "__top__":
        doc = value
    else:
        doc["model"][field] = value
    folder = fresh(tmp, config=doc)
    loads_or_clean_error(lambda: sleep_torch.load(folder))


COUNTERS = ("offset", "due", "seen", "sleeps", "n_layers", "format_version")


@FUZZ
@given(counter=st.sampled_from(COUNTERS),
       text=st.one_of(st.integers(-10, 10**12).map(str), st.text(max_size=6), st.sampled_from(["5", "0", "1e3"])),
       name_index=st.integers(0, 100), change=st.sampled_from(["none", "shape", "dtype", "drop", "nan"]),
       shape=st.lists(st.integers(0, 40), max_size=5))
def test_memory_files(tmp, counter, text, name_index, change, shape):
    header_text, body = split(Base.memory_bytes)
    header = json.loads(header_text)
    header["__metadata__"][counter] = text
    names = sorted(n for n in header if n != "__metadata__")
    name = names[name_index % len(names)]
    body = bytearray(body)
    if change == "shape":
        header[name]["shape"] = shape
    elif change == "dtype":
        header[name]["dtype"] = "F16" if header[name]["dtype"] == "F32" else "F32"
    elif change == "drop":
        del header[name]
    elif change == "nan":
        begin, end = header[name]["data_offsets"]
        if end - begin >= 4:
            body[begin:begin + 4] = np.float32(np.nan).tobytes()
    path = tmp / f"mem{len(list(tmp.iterdir()))}.safetensors"
    path.write_bytes(join(json.dumps(header).encode(), bytes(body)))
    state = loads_or_clean_error(lambda: Base.model.load_state(path))
    if state is not None:  # what loads runs
        with torch.no_grad():
            logits, _ = Base.model.step(torch.tensor([[1, 2, 3]]), state)
        assert torch.isfinite(logits).all()
