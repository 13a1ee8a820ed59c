"""Adversarial pass over every reader: corrupted model folders and memory files through every entry point.

    .venv/bin/python -m tests.adversarial [--only CLASS] [--keep DIR] [--timeout 30] [--memory-gb 3]

Builds a tiny model folder and a memory file, then corrupts them systematically (each corruption class x a
few variants: config sizes, malformed JSON, special files, safetensors headers, data offsets, dtypes, NaN
values, tokenizer and quantization blocks, shard indexes, task paths, random byte flips; memory-file
counters, tensors and bytes). Each case runs through the entry points:

    folders:  sleep_torch.load, sleep_mlx.load, convert.convert.convert_path,
              `lmsleep generate`, `lmsleep eval`, `lmsleep parity` (click's CliRunner)
    memories: HybridLM.load_state in torch and MLX, `lmsleep chat --memory`

in a worker process (memory capped with RLIMIT_AS, each entry point under a 30 s timeout; a worker that
hangs or dies is replaced) and prints the counts per class: tries / clean errors (one-line ValueError /
CheckpointError, or CLI exit 2 with one line) / tracebacks / hangs / accepted garbage (loaded or ran
although the input is corrupt). Not collected by pytest (the name does not start with test_).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULT = "@@RESULT "
FOLDER_ENTRIES = ("torch.load", "mlx.load", "convert_path", "cli.generate", "cli.eval", "cli.parity")
MEMORY_ENTRIES = ("torch.load_state", "mlx.load_state", "cli.chat")
SYMBOLS = ["0", "1", "|"]
TASK = {"name": "rule110", "params": {"width": 8, "states": 2, "steps": 2}}


# ================================================================ building the cases

def _split(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header, body: bytes) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def _ordered(header) -> list[str]:
    return sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])


def build_base(root: Path) -> tuple[Path, Path]:
    import torch

    import sleep_torch
    from common.config import ModelConfig

    cfg = ModelConfig.from_name("debug", vocab_size=3, window=8, eviction="sliding")
    base = root / "base"
    sleep_torch.save(sleep_torch.HybridLM(cfg, seed=0), base,
                     tokenizer={"type": "char", "symbols": SYMBOLS, "sep": ""}, task=TASK)
    model = sleep_torch.load(base)
    with torch.no_grad():
        _, state = model.step(torch.tensor([[0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0]]), model.new_state(1))
    model.save_state(state, root / "base-memory.safetensors")
    sharded = root / "base-sharded"
    sleep_torch.save(model, sharded, shard_size=20_000)
    return base, root / "base-memory.safetensors"


class Folder:
    """A copy of the base folder to corrupt."""

    def __init__(self, root: Path, base: Path, name: str, sharded: bool = False):
        self.path = root / name
        shutil.copytree(root / "base-sharded" if sharded else base, self.path, symlinks=True)

    @property
    def weights(self) -> Path:
        return self.path / "model.safetensors"

    def config(self, fn):
        doc = json.loads((self.path / "config.json").read_text())
        out = fn(doc)
        (self.path / "config.json").write_text(json.dumps(doc if out is None else out))

    def header(self, fn, body_fn=None):
        header, body = _split(self.weights.read_bytes())
        out = fn(header)
        body = body_fn(body) if body_fn else body
        self.weights.write_bytes(_join(header if out is None else out, body))

    def special(self, name: str, kind: str, root: Path):
        target = self.path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif os.path.lexists(target):
            target.unlink()
        if kind == "fifo":
            os.mkfifo(target)
        elif kind == "zero":
            target.symlink_to("/dev/zero")
        elif kind == "dir":
            target.mkdir()
        elif kind == "outside":
            (root / "outside.bin").write_bytes((root / "base" / "model.safetensors").read_bytes())
            target.symlink_to(root / "outside.bin")


def _set_model(field, value):
    return lambda d: d["model"].__setitem__(field, value)


def _entry(name, **changes):
    def fn(h):
        h[name].update(changes)
    return fn


def _shift(which: int, delta: int):
    def fn(h):
        name = _ordered(h)[which]
        a, b = h[name]["data_offsets"]
        h[name]["data_offsets"] = [a + delta, b + delta]
    return fn


def _recast(name: str, dtype: str, np_from, np_to):
    """Re-encode one tensor in another dtype and rebuild the offsets (a well-formed file, a wrong dtype)."""
    def fn(folder: Folder):
        header, body = _split(folder.weights.read_bytes())
        chunks = {n: body[header[n]["data_offsets"][0]:header[n]["data_offsets"][1]] for n in _ordered(header)}
        chunks[name] = np.frombuffer(chunks[name], np_from).astype(np_to).tobytes()
        header[name]["dtype"] = dtype
        out, offset = b"", 0
        for n in _ordered(header):
            header[n]["data_offsets"] = [offset, offset + len(chunks[n])]
            offset += len(chunks[n])
            out += chunks[n]
        folder.weights.write_bytes(_join(header, out))
    return fn


def _poison(name: str, value: float, bf16: bool = False):
    def fn(folder: Folder):
        header, body = _split(folder.weights.read_bytes())
        a = header[name]["data_offsets"][0]
        body = bytearray(body)
        raw = np.float32(value).tobytes()
        body[a:a + (2 if bf16 else 4)] = raw[2:] if bf16 else raw
        folder.weights.write_bytes(_join(header, bytes(body)))
    return fn


def _index(fn):
    def apply(folder: Folder, root: Path):
        path = folder.path / "model.safetensors.index.json"
        doc = json.loads(path.read_text())
        out = fn(doc, folder)
        path.write_text(json.dumps(doc if out is None else out))
    return apply


def _first_shard(doc):
    return next(iter(doc["weight_map"].items()))


def _shard_link_out(doc, folder: Folder):
    _, shard = _first_shard(doc)
    outside = folder.path.parent / f"outside-{folder.path.name}.safetensors"
    outside.write_bytes((folder.path / shard).read_bytes())
    (folder.path / shard).unlink()
    (folder.path / shard).symlink_to(outside)


def folder_cases():
    """(class, variant, sharded, corrupt(folder, root)) for every model-folder case."""
    C = []

    def add(cls, name, fn, sharded=False):
        C.append((cls, name, sharded, fn))

    for field, value in [("sleep_passes", 10**9), ("n_layers", 10**8), ("window", 10**9), ("vocab_size", 10**9),
                         ("d_model", 10**7), ("mlp_hidden", 10**9), ("n_heads", 10**6), ("conv_size", 10**6),
                         ("head_dim", 2**40), ("ssm_heads", 10**7)]:
        add("config-limits", f"{field}={value}", lambda f, r, a=field, v=value: f.config(_set_model(a, v)))
    raw = {"nan": '{"format": "lm-sleep", "format_version": 1, "model": NaN}',
           "deep": "[" * 200000 + "]" * 200000, "latin1": "\xff\xfe\xfa", "list": "[1, 2]", "huge-int": "9" * 5000,
           "empty": "", "truncated": '{"format": "lm-sleep", "model": {'}
    for name, text in raw.items():
        add("config-json", name, lambda f, r, t=text: (f.path / "config.json").write_bytes(t.encode("latin-1")))
    add("config-json", "rope-infinity", lambda f, r: (f.path / "config.json").write_text(
        (f.path / "config.json").read_text().replace('"rope_theta": 10000.0', '"rope_theta": Infinity')))
    add("config-json", "version-2", lambda f, r: f.config(lambda d: d.__setitem__("format_version", 2)))
    add("config-json", "model-list", lambda f, r: f.config(lambda d: d.__setitem__("model", [1])))
    add("config-json", "eps-negative", lambda f, r: f.config(_set_model("norm_eps", -1.0)))
    add("config-json", "sleep-layers-str", lambda f, r: f.config(_set_model("sleep_layers", "ab")))
    for file in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        for kind in ("fifo", "zero", "dir"):
            add("special-files", f"{file}:{kind}", lambda f, r, n=file, k=kind: f.special(n, k, r))
    add("special-files", "weights-link-outside", lambda f, r: f.special("model.safetensors", "outside", r))
    headers = {
        "list": lambda h: b"[1, 2, 3]", "number": lambda h: b"42", "string": lambda h: b'"x"',
        "null": lambda h: b"null", "string-entry": lambda h: {**h, "norm.weight": "F32"},
        "missing-key": lambda h: {**h, "norm.weight": {"dtype": "F32", "shape": [32]}},
        "extra-key": lambda h: {**h, "norm.weight": {**h["norm.weight"], "x": 1}},
        "unknown-dtype": _entry("norm.weight", dtype="F128"), "dtype-int": _entry("norm.weight", dtype=4),
        "shape-float": _entry("norm.weight", shape=[32.0]), "shape-negative": _entry("norm.weight", shape=[-32]),
        "shape-huge": _entry("norm.weight", shape=[2**62, 2**62]), "shape-str": _entry("norm.weight", shape="32"),
        "offsets-three": _entry("norm.weight", data_offsets=[0, 1, 2]),
        "offsets-str": _entry("norm.weight", data_offsets=["0", "128"]),
        "metadata-int": lambda h: {**h, "__metadata__": {"format": 1}},
        "bytes-vs-shape": _entry("norm.weight", shape=[16]), "non-utf8": lambda h: b'{"\xff": 1}',
    }
    for name, fn in headers.items():
        add("headers", name, lambda f, r, g=fn: f.header(g))
    add("headers", "length-2^63",
        lambda f, r: f.weights.write_bytes(struct.pack("<Q", 2**63) + f.weights.read_bytes()[8:]))
    add("headers", "length-0", lambda f, r: f.weights.write_bytes(struct.pack("<Q", 0) + f.weights.read_bytes()[8:]))
    add("headers", "empty-file", lambda f, r: f.weights.write_bytes(b""))
    add("headers", "five-bytes", lambda f, r: f.weights.write_bytes(b"\0" * 5))
    add("offsets", "negative", lambda f, r: f.header(_shift(0, -16)))
    add("offsets", "overlap", lambda f, r: f.header(_shift(1, -4)))
    add("offsets", "gap", lambda f, r: f.header(_shift(1, 4)))
    add("offsets", "short-data", lambda f, r: f.header(lambda h: None, lambda b: b[:-4]))
    add("offsets", "trailing-data", lambda f, r: f.header(lambda h: None, lambda b: b + b"\0" * 64))
    add("offsets", "beyond-end", lambda f, r: f.header(_shift(-1, 4096)))
    add("dtypes", "I32-weight", lambda f, r: f.header(_entry("norm.weight", dtype="I32")))
    add("dtypes", "U32-weight", lambda f, r: f.header(_entry("layers.0.attn.q_proj.weight", dtype="U32")))
    add("dtypes", "F64-weight", lambda f, r: f.header(_entry("norm.weight", dtype="F64", shape=[16])))
    add("dtypes", "mixed-F16", lambda f, r: _recast("norm.weight", "F16", np.float32, np.float16)(f))
    add("dtypes", "BOOL-weight", lambda f, r: _recast("layers.1.ssm.A_log", "BOOL", np.float32, np.bool_)(f))
    for name, value in [("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf)]:
        add("values", f"f32-{name}", lambda f, r, v=value: _poison("layers.1.ssm.q_proj.weight", v)(f))
    add("values", "embed-nan", lambda f, r: _poison("embed.weight", np.nan)(f))
    tokenizers = {"char-too-big": {"type": "char", "symbols": SYMBOLS + ["x"], "sep": ""}, "byte": {"type": "byte"},
                  "unknown": {"type": "sentencepiece"}, "hf-dotdot": {"type": "hf", "file": "../tokenizer.json"},
                  "hf-missing": {"type": "hf"}, "symbols-str": {"type": "char", "symbols": "01|"},
                  "not-a-dict": [1, 2]}
    for name, block in tokenizers.items():
        add("tokenizer", name, lambda f, r, b=block: f.config(lambda d: d.__setitem__("tokenizer", b)))
    quant = {"group-0": {"bits": 4, "group_size": 0, "layers": ["layers.0.mlp.up_proj"]},
             "bits-7": {"bits": 7, "group_size": 32, "layers": ["layers.0.mlp.up_proj"]},
             "layers-empty": {"bits": 4, "group_size": 32, "layers": []},
             "layers-str": {"bits": 4, "group_size": 32, "layers": "layers.0.mlp.up_proj"},
             "block-list": [4, 32], "embed": {"bits": 4, "group_size": 32, "layers": ["embed"]},
             "bits-str": {"bits": "4", "group_size": 32, "layers": ["layers.0.mlp.up_proj"]}}
    for name, block in quant.items():
        add("quantization", name, lambda f, r, b=block: f.config(lambda d: d.__setitem__("quantization", b)))
    index = {
        "dotdot": lambda d, f: d["weight_map"].__setitem__(_first_shard(d)[0], "../" + _first_shard(d)[1]),
        "absolute": lambda d, f: d["weight_map"].__setitem__(_first_shard(d)[0], str(f.path / _first_shard(d)[1])),
        "etc-passwd": lambda d, f: d["weight_map"].__setitem__(_first_shard(d)[0], "/etc/passwd"),
        "subdir": lambda d, f: d["weight_map"].__setitem__(_first_shard(d)[0], "sub/x.safetensors"),
        "not-a-dict": lambda d, f: {"weight_map": list(d["weight_map"])},
        "value-int": lambda d, f: d["weight_map"].__setitem__(_first_shard(d)[0], 3),
        "moved": lambda d, f: d["weight_map"].__setitem__(
            _first_shard(d)[0], next(s for s in d["weight_map"].values() if s != _first_shard(d)[1])),
        "unlisted": lambda d, f: d["weight_map"].__setitem__("layers.9.norm1.weight", _first_shard(d)[1]),
        "link-out": _shard_link_out,
        "empty": lambda d, f: {"weight_map": {}},
    }
    for name, fn in index.items():
        add("shard-index", name, _index(fn), sharded=True)
    add("shard-index", "index-fifo", lambda f, r: f.special("model.safetensors.index.json", "fifo", r), sharded=True)
    task = {"dotdot": {"name": "text", "params": {"path": "../secret.txt", "seq_len": 4, "window": 8}},
            "etc-passwd": {"name": "text", "params": {"path": "/etc/passwd", "seq_len": 4, "window": 8}},
            "fifo-inside": {"name": "text", "params": {"path": "data.fifo", "seq_len": 4, "window": 8}},
            "steps-1e9": {"name": "rule110", "params": {"width": 8, "states": 2, "steps": 10**9}},
            "width-1e6": {"name": "rule110", "params": {"width": 10**6, "states": 999999, "steps": 1}},
            "params-list": {"name": "rule110", "params": [1]}}
    for name, block in task.items():
        def corrupt(f, r, b=block, n=name):
            (r / "secret.txt").write_text("secret " * 100)
            if n == "fifo-inside":
                os.mkfifo(f.path / "data.fifo")
            f.config(lambda d: d.__setitem__("task", b))
        add("task-path", name, corrupt)
    rng = np.random.default_rng(0)
    for i in range(20):
        edits = [(int(rng.integers(0, 10**6)), int(rng.integers(0, 256))) for _ in range(int(rng.integers(1, 4)))]

        def flip(f, r, e=edits):
            data = bytearray(f.weights.read_bytes())
            end = 8 + struct.unpack("<Q", data[:8])[0]
            for pos, value in e:
                data[pos % end] = value
            f.weights.write_bytes(bytes(data))
        add("random-flips", f"flip{i}", flip)
    return C


def _rewrite_memory(src: Path, dst: Path, meta=None, drop=None, add=None, change=None, body_fn=None, raw=None):
    if raw is not None:
        dst.write_bytes(raw(src.read_bytes()))
        return
    header, body = _split(src.read_bytes())
    tensors = {n: (e["dtype"], e["shape"], body[e["data_offsets"][0]:e["data_offsets"][1]])
               for n, e in header.items() if n != "__metadata__"}
    if drop:
        del tensors[drop]
    if add:
        tensors[add[0]] = add[1]
    if change:
        tensors[change[0]] = change[1](*tensors[change[0]])
    new, data = {"__metadata__": {**header["__metadata__"], **(meta or {})}}, b""
    for n, (dtype, shape, chunk) in tensors.items():
        new[n] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(chunk)]}
        data += chunk
    dst.write_bytes(_join(new, body_fn(data) if body_fn else data))


def _set_first(value):
    def fn(dtype, shape, chunk):
        a = np.frombuffer(chunk, np.float32).copy()
        a[0] = value
        return dtype, shape, a.tobytes()
    return fn


def memory_cases():
    C = []

    def add(cls, name, **kw):
        C.append((cls, name, kw))

    for name in ("conv.1", "committed.1", "running.1", "cur_k.0", "past_v.0", "hidden"):
        add("memory-tensors", f"missing-{name}", drop=name)
    add("memory-tensors", "extra", add=("bonus.0", ("F32", [1], b"\0" * 4)))
    add("memory-tensors", "shape-running", change=("running.1", lambda d, s, c: (d, [1, 2, 16, 8, 2], c)))
    add("memory-tensors", "shape-hidden", change=("hidden", lambda d, s, c: (d, [s[0], s[2], s[1]], c)))
    add("memory-tensors", "dtype-I32", change=("running.1", lambda d, s, c: ("I32", s, c)))
    add("memory-tensors", "dtype-F16-state", change=("committed.1", lambda d, s, c: (
        "F16", s, np.frombuffer(c, np.float32).astype(np.float16).tobytes())))
    add("memory-tensors", "past-too-long", change=("past_k.0", lambda d, s, c: (d, [s[0], 9, *s[2:]], c + c[:1] * 0 +
                                                                              b"\0" * (4 * 16 * 2 * (9 - s[1])))))
    add("memory-values", "nan-state", change=("committed.1", _set_first(np.nan)))
    add("memory-values", "inf-hidden", change=("hidden", _set_first(np.inf)))
    add("memory-values", "nan-key", change=("cur_k.0", _set_first(np.nan)))
    counters = {"seen=-5": {"seen": "-5"}, "seen=1_0": {"seen": "1_0"}, "due=1e9": {"due": str(10**9)},
                "due-mid-window": {"due": "2"}, "offset=99": {"offset": "99"}, "seen<offset": {"seen": "1"},
                "sleeps>seen": {"sleeps": "999"}, "n_layers=3": {"n_layers": "3"}, "offset=x": {"offset": "x"},
                "seen-huge": {"seen": "9" * 30}, "format": {"format": "other"}, "version": {"format_version": "2"},
                "hash": {"model_hash": "0" * 64}, "offset-unicode-digits": {"offset": "\u0663"}}
    for name, meta in counters.items():
        add("memory-counters", name, meta=meta)
    add("memory-bytes", "truncated", raw=lambda b: b[:-10])
    add("memory-bytes", "empty", raw=lambda b: b"")
    add("memory-bytes", "header-list", raw=lambda b: _join(b"[1]", b""))
    add("memory-bytes", "length-huge", raw=lambda b: struct.pack("<Q", 2**60) + b[8:])
    add("memory-special", "fifo")
    add("memory-special", "dev-zero")
    rng = np.random.default_rng(1)
    for i in range(8):
        edits = [(int(rng.integers(0, 10**6)), int(rng.integers(0, 256))) for _ in range(int(rng.integers(1, 4)))]

        def flip(b, e=edits):
            data = bytearray(b)
            end = 8 + struct.unpack("<Q", data[:8])[0]
            for pos, value in e:
                data[pos % end] = value
            return bytes(data)
        add("memory-flips", f"flip{i}", raw=flip)
    return C


# ================================================================ the worker (one process, many cases)

class Hang(BaseException):
    """Raised by the alarm: not an OSError (TimeoutError is one, and readers catch OSError)."""


def _alarm(signum, frame):
    raise Hang("timed out")


def _cli(args, input=None):
    from click.testing import CliRunner

    from lmsleep.cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args], input=input)
    text = result.output.strip()
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        if isinstance(result.exception, MemoryError):
            raise result.exception
        return "traceback", f"{type(result.exception).__name__}: {str(result.exception)[:150]}"
    if result.exit_code == 0:
        return "ok", text[-2000:]
    lines = [ln for ln in text.splitlines() if ln.startswith("Error:")]
    if result.exit_code == 2 and len(lines) == 1 and "Traceback" not in text:
        return "clean", lines[0][:200]
    return "traceback", f"exit {result.exit_code}: {text[-200:]}"


def _library(fn):
    try:
        fn()
    except MemoryError:
        raise
    except ValueError as e:
        message = str(e)
        if message and "\n" not in message:
            return "clean", message[:200]
        return "traceback", f"multi-line {type(e).__name__}: {message[:200]!r}"
    except Exception as e:  # noqa: BLE001 - the point is to see every other exception
        return "traceback", f"{type(e).__name__}: {str(e)[:200]}"
    return "ok", ""


def run_entry(kind: str, entry: str, case: Path, base: Path, scratch: Path):
    if kind == "folder":
        if entry == "torch.load":
            import sleep_torch
            return _library(lambda: sleep_torch.load(case))
        if entry == "mlx.load":
            import sleep_mlx
            return _library(lambda: sleep_mlx.load(case))
        if entry == "convert_path":
            from convert.convert import convert_path
            dst = scratch / f"converted-{case.name}"
            out = _library(lambda: convert_path(case, dst, to="mlx", overwrite=True))
            shutil.rmtree(dst, ignore_errors=True)
            return out
        if entry == "cli.generate":
            return _cli(["generate", case, "--prompt", "0110", "--max-tokens", "4", "--backend", "torch"])
        if entry == "cli.eval":
            return _cli(["eval", case, "--n", "2", "--backend", "torch"])
        if entry == "cli.parity":
            return _cli(["parity", case, "--tokens", "10", "--batch", "1", "--gen-tokens", "2"])
    else:
        if entry == "torch.load_state":
            import sleep_torch
            model = sleep_torch.load(base)
            return _library(lambda: model.load_state(case))
        if entry == "mlx.load_state":
            import sleep_mlx
            model = sleep_mlx.load(base)
            return _library(lambda: model.load_state(case))
        if entry == "cli.chat":  # a memory that cannot be loaded is reported in one line, the chat starts empty
            outcome, detail = _cli(["chat", base, "--memory", case, "--backend", "torch", "--max-tokens", "2"],
                                   input="01\n/quit\n")
            errors = [ln for ln in detail.splitlines() if ln.startswith("error:")]
            if outcome == "ok" and "[memory loaded" not in detail and len(errors) == 1:
                return "clean", errors[0][:200]
            return outcome, detail
    raise AssertionError(entry)


def worker(timeout: int) -> None:
    """Read {"kind", "entry", "case", "base", "scratch"} lines on stdin, print one RESULT line per request."""
    import torch  # noqa: F401 - import once, before any case
    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, _alarm)
    for line in sys.stdin:
        req = json.loads(line)
        signal.alarm(timeout)
        try:
            outcome, detail = run_entry(req["kind"], req["entry"], Path(req["case"]), Path(req["base"]),
                                        Path(req["scratch"]))
        except Hang:
            outcome, detail = "hang", "timed out in the worker"
        except MemoryError:
            outcome, detail = "oom", "MemoryError (address-space limit)"
        finally:
            signal.alarm(0)
        sys.stdout.write(RESULT + json.dumps({"outcome": outcome, "detail": detail}) + "\n")
        sys.stdout.flush()


class Worker:
    """The parent's handle on a worker process: restarted after a hang or a crash."""

    def __init__(self, timeout: int, memory_gb: float):
        self.timeout, self.limit, self.proc = timeout, int(memory_gb * (1 << 30)), None

    def start(self):
        limit = self.limit

        def cap():
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            os.setsid()

        env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.adversarial", "--worker", "--timeout",
                                      str(self.timeout)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, preexec_fn=cap, text=True, bufsize=1,
                                     cwd=Path(__file__).resolve().parents[1], env=env)

    def ask(self, req: dict) -> tuple[str, str]:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + self.timeout + 60  # the import of a fresh worker included
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(left, 0))
            if not ready:
                self.kill()
                return "hang", "no answer (killed)"
            line = self.proc.stdout.readline()
            if not line:
                code = self.proc.wait()
                self.proc = None
                return ("oom" if code in (-9, -6, 137) else "traceback"), f"worker died (exit {code})"
            if line.startswith(RESULT):
                out = json.loads(line[len(RESULT):])
                return out["outcome"], out["detail"]

    def kill(self):
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None


# ================================================================ the parent

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=int, default=30, help="seconds per entry point")
    p.add_argument("--memory-gb", type=float, default=3.0, help="address-space limit of the worker (RLIMIT_AS)")
    p.add_argument("--only", help="run only the corruption classes whose name contains this")
    p.add_argument("--keep", help="build the cases in this folder and keep them")
    p.add_argument("--verbose", action="store_true", help="print every case's outcome")
    args = p.parse_args(argv)
    if args.worker:
        worker(args.timeout)
        return 0
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lmsleep-adversarial-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        return run_all(root, args)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def run_all(root: Path, args) -> int:
    base, memory = build_base(root)
    scratch = root / "scratch"
    scratch.mkdir()
    requests = []
    for cls, name, sharded, corrupt in folder_cases():
        if args.only and args.only not in cls:
            continue
        f = Folder(root, base, f"{cls}-{name}".replace("/", "_").replace(":", "_"), sharded)
        corrupt(f, root)
        entries = ("cli.eval",) if cls == "task-path" else FOLDER_ENTRIES  # only eval reads the task
        requests += [(cls, name, "folder", entry, f.path) for entry in entries]
    for cls, name, kw in memory_cases():
        if args.only and args.only not in cls:
            continue
        path = root / f"mem-{cls}-{name}.safetensors"
        if name == "fifo":
            os.mkfifo(path)
        elif name == "dev-zero":
            path.symlink_to("/dev/zero")
        else:
            _rewrite_memory(memory, path, **kw)
        requests += [(cls, name, "memory", entry, path) for entry in MEMORY_ENTRIES]
    n_folders = len({r[4] for r in requests if r[2] == "folder"})
    n_memories = len({r[4] for r in requests if r[2] == "memory"})
    print(f"{n_folders} corrupted model folders, {n_memories} corrupted memory files, {len(requests)} runs "
          f"(timeout {args.timeout} s, address space {args.memory_gb} GiB)", flush=True)
    w = Worker(args.timeout, args.memory_gb)
    table = collections.defaultdict(collections.Counter)
    problems = []
    t0 = time.time()
    try:
        for cls, name, kind, entry, path in requests:
            outcome, detail = w.ask({"kind": kind, "entry": entry, "case": str(path), "base": str(base),
                                     "scratch": str(scratch)})
            if outcome == "ok":
                outcome = "garbage"  # every case is corrupt: loading or running it is accepting garbage
            table[cls]["tries"] += 1
            table[cls][outcome] += 1
            table["TOTAL"]["tries"] += 1
            table["TOTAL"][outcome] += 1
            if outcome != "clean" or args.verbose:
                problems.append(f"  {outcome:9} {cls}/{name} {entry}: {' | '.join(detail.splitlines())[-300:]}")
    finally:
        w.kill()
    cols = ("tries", "clean", "traceback", "hang", "oom", "garbage")
    print(f"\n{'class':18}" + "".join(f"{c:>10}" for c in cols))
    for cls in [c for c in table if c != "TOTAL"] + ["TOTAL"]:
        print(f"{cls:18}" + "".join(f"{table[cls][c]:>10}" for c in cols))
    print(f"\n({time.time() - t0:.0f} s)")
    if problems:
        print("\nnot clean:" if not args.verbose else "\nall:")
        print("\n".join(problems))
    total = table["TOTAL"]
    return 0 if total["clean"] == total["tries"] else 1


if __name__ == "__main__":
    sys.exit(main())
