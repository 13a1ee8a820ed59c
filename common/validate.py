"""One validation layer for everything lm-sleep reads from disk (docs/FORMAT.md "Limits").

Every reader in the project goes through these checks before it trusts a byte of a file:

    regular_file(path, folder)        a plain file (lstat first: never opens a FIFO or a device; a link is
                                      followed only when it stays inside `folder`)
    read_json(path, what, folder)     a bounded, regular JSON file (no NaN / Infinity, no runaway nesting)
    read_safetensors(path, folder)    the one safetensors header reader: entries, metadata, data start
    check_header(header, size, path)  the header's JSON: entries, dtypes, shapes, offsets tiling the data
    check_index(doc, folder)          a shard index: weight_map of plain file names inside the folder
    check_dtypes(found, quantized)    one float dtype per folder, integers only where quantization says
    check_quantization(block)         bits / group_size from the allowed sets, a list of layers
    check_tokenizer_block(block, ..)  char / byte / hf, no larger than the model's vocabulary
    check_finite(path, entries, start)  every float tensor finite, read through a memory map
    check_memory(path, ...)           a memory file's counters and tensors against the model
    task_file(folder, path)           a path recorded in config.json, resolved inside the model folder

Errors are one-line `CheckpointError`s (a ValueError) naming the file, the key and the value.
Framework-free: numpy and the standard library only.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from pathlib import Path

import numpy as np

from common.config import LIMITS, MAX_SLEEP_PASSES, ModelConfig


class CheckpointError(ValueError):
    """A model folder or memory file that cannot be used; the message is one line for the user."""


# safetensors dtype tag -> bytes per element (the tags a header may name)
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "U32": 4, "BOOL": 1}
FLOAT_TAGS = ("F32", "BF16", "F16")  # the float dtypes of weights and activations (one per folder)
QUANT_TAG = "U32"  # packed quantized weights
QUANT_BITS = (2, 3, 4, 5, 6, 8)
QUANT_GROUP_SIZES = (32, 64, 128)
TOKENIZER_KINDS = ("char", "byte", "hf")
BYTE_VOCAB = 258  # common.tokenizers.ByteTokenizer: 256 bytes + <eot> + <pad>

MAX_JSON_BYTES = 64 << 20  # config.json, shard index, tokenizer.json, chat template
MAX_HEADER_BYTES = 100 << 20  # a safetensors header (the safetensors library's own cap)
MAX_DIMS = 8  # dimensions of one tensor
MAX_BATCH = 1 << 16  # rows of a memory file's State
MAX_SEEN = 1 << 62  # tokens a memory file may say it has seen
_FINITE_CHUNK = 1 << 22  # elements checked at a time (bounded temporary memory)
_COUNTER = re.compile(r"0|[1-9][0-9]{0,18}")  # a plain non-negative decimal (no sign, '_' or other digits)


def shown(value, width: int = 60) -> str:
    """repr(value), cut to `width` characters (a hostile file must not make a message huge)."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def shown_name(name, width: int = 80) -> str:
    """A tensor name as it is when it is short and printable, else its cut repr."""
    ok = isinstance(name, str) and name.isprintable() and len(name) <= width
    return name if ok else shown(name, width)


# --- files ---------------------------------------------------------------------------------------

def regular_file(path: str | os.PathLike, folder: str | os.PathLike | None = None, what: str = "file") -> Path:
    """`path` when it is a regular file; else a CheckpointError. Checked with lstat before anything opens it,
    so a FIFO or a device is refused without blocking. A symbolic link is followed only when its target is a
    regular file inside `folder` (with folder None, a link to any regular file is fine: a path the user gave)."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing ({what})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        try:
            target = path.resolve(strict=True)
            st = os.stat(target)
        except (OSError, RuntimeError):
            raise CheckpointError(f"{path}: a broken symbolic link ({what})") from None
        if folder is not None and not target.is_relative_to(Path(folder).resolve()):
            raise CheckpointError(f"{path}: a symbolic link to {target}, outside the model folder {folder}")
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, socket or device)"
        raise CheckpointError(f"{path}: {kind}; expected the {what}")
    return path


def plain_name(name, where: str, key: str) -> str:
    """A file name that can only mean a file directly inside the folder (no '..', no '/', not absolute)."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\x00" in name or os.path.isabs(name) or len(name) > 255):
        raise CheckpointError(f"{where}: {key} {shown(name)} must be a plain file name inside the model folder")
    return name


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def parse_json(text: bytes | str, where: str):
    """JSON text -> value; NaN / Infinity, invalid UTF-8 and runaway nesting are one-line CheckpointErrors."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise CheckpointError(f"{where}: not valid JSON ({first})") from None


def read_json(path: str | os.PathLike, what: str = "JSON file", folder: str | os.PathLike | None = None,
              limit: int = MAX_JSON_BYTES):
    """The parsed JSON of a regular file of at most `limit` bytes."""
    path = regular_file(path, folder, what)
    size = os.stat(path).st_size
    if size > limit:
        raise CheckpointError(f"{path}: {size} bytes, more than the {limit >> 20} MiB a {what} may have")
    with open(path, "rb") as f:
        return parse_json(f.read(limit + 1), str(path))


def read_text(path: str | os.PathLike, what: str, folder: str | os.PathLike | None = None,
              limit: int = MAX_JSON_BYTES) -> str:
    """A bounded, regular UTF-8 text file inside `folder` (tokenizer.json, a chat template)."""
    path = regular_file(path, folder, what)
    size = os.stat(path).st_size
    if size > limit:
        raise CheckpointError(f"{path}: {size} bytes, more than the {limit >> 20} MiB a {what} may have")
    with open(path, "rb") as f:
        try:
            return f.read(limit + 1).decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start})") from None


# --- safetensors headers --------------------------------------------------------------------------

def read_safetensors(path: str | os.PathLike, folder: str | os.PathLike | None = None
                     ) -> tuple[dict[str, dict], dict[str, str], int]:
    """The one safetensors header reader: (tensor entries, `__metadata__`, offset where the data starts).

    An entry is {"dtype", "shape" (tuple), "data_offsets" (begin, end relative to the data start)}; the
    entries are checked by `check_header`, so the data they describe lies exactly in the file.
    """
    path = regular_file(path, folder, "safetensors file")
    size = os.stat(path).st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)  # little-endian u64: the header's length in bytes
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, "
                                  f"file of {size})")
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: safetensors header of {n} bytes (at most {MAX_HEADER_BYTES})")
        text = f.read(n)
    header = parse_json(text, f"{path}: safetensors header")
    entries, meta = check_header(header, size - 8 - n, path)
    return entries, meta, 8 + n


def check_header(header, data_size: int, path) -> tuple[dict[str, dict], dict[str, str]]:
    """A parsed safetensors header -> (entries, metadata). Entries must have a known dtype, a shape of at
    most MAX_DIMS non-negative ints, byte counts equal to prod(shape) * dtype size, and offsets that tile
    the data exactly: sorted, contiguous from 0, non-overlapping, ending at the data size."""
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, "
                              "expected an object)")
    meta = header.get("__metadata__", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _check_entry(name, info, path)
    cursor = 0
    for name, info in sorted(entries.items(), key=lambda kv: kv[1]["data_offsets"]):
        begin, end = info["data_offsets"]
        if begin != cursor:
            why = "overlaps the tensor before it" if begin < cursor else "leaves a gap before it"
            raise CheckpointError(f"{path}: tensor {shown_name(name)} data_offsets [{begin}, {end}] {why}")
        cursor = end
    if cursor != data_size:
        kind = "truncated safetensors file" if cursor > data_size else "corrupt safetensors file"
        raise CheckpointError(f"{path}: {kind} (the tensors need {cursor} data bytes, the file holds {data_size})")
    return entries, meta


def _check_entry(name, info, path) -> dict:
    where = f"{path}: tensor {shown_name(name)}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{path}: corrupt safetensors header (entry {shown_name(name)} must be an object with "
                              "exactly dtype, shape and data_offsets)")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise CheckpointError(f"{where} has unsupported dtype {shown(dtype)}")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(type(d) is int and d >= 0 for d in shape)):
        raise CheckpointError(f"{where} has shape {shown(shape)}; expected a list of at most {MAX_DIMS} "
                              "non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
        raise CheckpointError(f"{where} has data_offsets {shown(offsets)}; expected two integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise CheckpointError(f"{where} has data_offsets [{begin}, {end}]; expected 0 <= begin <= end")
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != nbytes:
        raise CheckpointError(f"{where} has {end - begin} bytes for shape {shape} {dtype} ({nbytes} expected)")
    return {"dtype": dtype, "shape": tuple(shape), "data_offsets": (begin, end)}


# --- model folders --------------------------------------------------------------------------------

def check_index(doc, folder: str | os.PathLike, path) -> dict[str, str]:
    """A shard index document -> its weight_map {tensor name: shard file name}. Every file is a plain
    name of a regular file inside the folder (a link only when it stays inside)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict) or not doc["weight_map"]:
        raise CheckpointError(f"{path}: corrupt shard index (expected {{\"weight_map\": {{tensor: file}}}})")
    weight_map = doc["weight_map"]
    for name, file in weight_map.items():
        if not isinstance(file, str):
            raise CheckpointError(f"{path}: weight_map[{shown_name(name)}] is {shown(file)}, expected a file name")
        plain_name(file, str(path), f"weight_map[{shown_name(name)}]")
    for file in sorted(set(weight_map.values())):
        regular_file(Path(folder) / file, folder, "weights shard named by the index")
    return weight_map


def check_dtypes(found: dict[str, str], quantized: set[str], where: dict[str, Path]) -> str:
    """One float dtype (F32 / BF16 / F16) for every tensor, except the U32 packed weights of quantized
    layers -> that float dtype's tag."""
    floats: dict[str, str] = {}
    for name, dtype in found.items():
        packed = name.endswith(".weight") and name[: -len(".weight")] in quantized
        want = (QUANT_TAG,) if packed else FLOAT_TAGS
        if dtype not in want:
            kind = "a packed quantized weight" if packed else "a weight"
            raise CheckpointError(f"{where[name]}: tensor {name} has dtype {dtype}; {kind} must be "
                                  f"{' / '.join(want)}")
        if not packed:
            floats.setdefault(dtype, name)
    if len(floats) > 1:
        (a, first), (b, second) = list(floats.items())[:2]
        raise CheckpointError(f"{where[second]}: tensor {second} is {b} but {first} is {a}; a model folder holds "
                              "one float dtype (lmsleep convert --dtype casts it)")
    return next(iter(floats), "F32")


def check_quantization(block, path) -> tuple[int, int, list[str]]:
    """config.json's quantization block -> (bits, group_size, layers)."""
    if not isinstance(block, dict):
        raise CheckpointError(f"{path}: quantization must be an object {{bits, group_size, layers}}, "
                              f"got {shown(block)}")
    bits, group, layers = block.get("bits"), block.get("group_size"), block.get("layers")
    if type(bits) is not int or bits not in QUANT_BITS:
        raise CheckpointError(f"{path}: quantization.bits={shown(bits)}; expected one of {QUANT_BITS}")
    if type(group) is not int or group not in QUANT_GROUP_SIZES:
        raise CheckpointError(f"{path}: quantization.group_size={shown(group)}; expected one of "
                              f"{QUANT_GROUP_SIZES}")
    if (not isinstance(layers, list) or not layers or not all(isinstance(x, str) for x in layers)
            or len(set(layers)) != len(layers)):
        raise CheckpointError(f"{path}: quantization.layers={shown(layers)}; expected a non-empty list of "
                              "distinct layer names")
    return bits, group, layers


def check_tokenizer_block(block, vocab_size: int, folder, path) -> None:
    """config.json's tokenizer block: a known kind whose size fits the model's vocabulary; an 'hf'
    block names a regular tokenizer file inside the folder. The tokenizer itself is built later."""
    if block is None:
        return
    if not isinstance(block, dict) or block.get("type") not in TOKENIZER_KINDS:
        kind = block.get("type") if isinstance(block, dict) else block
        raise CheckpointError(f"{path}: tokenizer.type={shown(kind)}; expected one of {TOKENIZER_KINDS}")
    kind = block["type"]
    if kind == "char":
        symbols = block.get("symbols")
        if not isinstance(symbols, list) or not all(isinstance(s, str) for s in symbols):
            raise CheckpointError(f"{path}: tokenizer.symbols must be a list of strings")
        size = len(symbols)
    elif kind == "byte":
        size = BYTE_VOCAB
    else:
        name = plain_name(block.get("file", "tokenizer.json"), str(path), "tokenizer.file")
        check_companions(folder, [name], required=True)
        return  # its size is known once it is built: check_tokenizer
    if size > vocab_size:
        raise CheckpointError(f"{path}: the {kind} tokenizer has {size} tokens, more than the model's "
                              f"vocab_size={vocab_size}")


def check_tokenizer(tokenizer, vocab_size: int, path) -> None:
    """A built tokenizer must not produce ids the model cannot embed."""
    if tokenizer is not None and tokenizer.vocab_size > vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                              f"vocab_size={vocab_size}")


def check_companions(folder: str | os.PathLike, names, required: bool = False) -> None:
    """Files a model folder may hold beside its weights (tokenizer.json, a chat template): when present
    (always, with required), regular files inside the folder of at most MAX_JSON_BYTES."""
    for name in names:
        path = Path(folder) / name
        if required or os.path.lexists(path):
            regular_file(path, folder, name)
            if os.stat(path).st_size > MAX_JSON_BYTES:
                raise CheckpointError(f"{path}: more than {MAX_JSON_BYTES >> 20} MiB")


# --- tensor values --------------------------------------------------------------------------------

_EXPONENT = {"F32": (np.uint32, 0x7F800000), "F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80),
             "F64": (np.uint64, 0x7FF0000000000000)}


def check_finite(path, entries: dict[str, dict], start: int) -> None:
    """Every float tensor of a safetensors file holds finite numbers (no NaN, no infinity). The data is
    read through a memory map, a bounded chunk at a time, on the bit patterns (bf16 included)."""
    floats = [(n, e) for n, e in entries.items() if e["dtype"] in _EXPONENT and e["data_offsets"][1] >
              e["data_offsets"][0]]
    if not floats:
        return
    data = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        for name, e in floats:
            bits, mask = _EXPONENT[e["dtype"]]
            begin, end = e["data_offsets"]
            words = data[start + begin:start + end].view(np.dtype(bits).newbyteorder("<"))
            for i in range(0, words.size, _FINITE_CHUNK):
                chunk = words[i:i + _FINITE_CHUNK]
                if ((chunk & bits(mask)) == bits(mask)).any():
                    raise CheckpointError(f"{path}: tensor {name} holds NaN or infinite values")
    finally:
        del data


# --- memory files ---------------------------------------------------------------------------------

def memory_counters(meta: dict[str, str], config: ModelConfig, path) -> dict[str, int]:
    """A memory file's counters, each a plain decimal string, bounded and consistent with the window:
    0 <= offset <= window; 0 <= due <= MAX_SLEEP_PASSES, due > 0 exactly when offset == window (a full
    window waits for its sleep); seen >= offset; 0 <= sleeps <= seen."""
    values = {}
    for key in ("n_layers", "offset", "due", "seen", "sleeps"):
        text = meta.get(key)
        if not isinstance(text, str) or _COUNTER.fullmatch(text) is None:
            raise CheckpointError(f"{path}: memory counter {key}={shown(text)} is not a non-negative integer")
        values[key] = int(text)
    L, c = config.window, values
    if c["n_layers"] != config.n_layers:
        raise CheckpointError(f"{path}: memory file has {c['n_layers']} blocks, the model {config.n_layers}")
    checks = (("offset", c["offset"] <= L, f"must be in [0, window={L}]"),
              ("due", c["due"] <= MAX_SLEEP_PASSES, f"must be in [0, {MAX_SLEEP_PASSES}]"),
              ("due", (c["due"] > 0) == (c["offset"] == L), f"must be > 0 exactly when offset == window ({L}); "
                                                             f"offset is {c['offset']}"),
              ("seen", c["offset"] <= c["seen"] <= MAX_SEEN, f"must be in [offset={c['offset']}, {MAX_SEEN}]"),
              ("sleeps", c["sleeps"] <= c["seen"], f"must be <= seen={c['seen']}"))
    for key, ok, why in checks:
        if not ok:
            raise CheckpointError(f"{path}: memory counter {key}={c[key]} {why}")
    return values


def memory_shapes(config: ModelConfig, counters: dict[str, int], batch: int, past: int,
                  act: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype tag, shape) of every tensor a memory file of this model must hold (common.sleep
    caches: attention past/cur keys and values, SSM committed/running states and the conv tail)."""
    c, B, offset = config, batch, counters["offset"]
    dk, dv = c.ssm_heads * c.ssm_head_dim, c.ssm_heads * c.ssm_v_dim
    out = {"hidden": (act, (B, offset, c.d_model))}
    for i, kind in enumerate(c.layer_types):
        if kind == "A":
            for field, length in (("past_k", past), ("past_v", past), ("cur_k", offset), ("cur_v", offset)):
                out[f"{field}.{i}"] = (act, (B, length, c.kv_heads, c.head_dim))
        else:
            for field in ("committed", "running"):
                out[f"{field}.{i}"] = ("F32", (B, c.ssm_heads, c.ssm_v_dim, c.ssm_head_dim))
            if c.conv_size and offset:
                out[f"conv.{i}"] = (act, (B, c.conv_size - 1, 2 * dk + dv))
    return out


def check_memory(path, entries: dict[str, dict], meta: dict[str, str], config: ModelConfig, act: str | None,
                 start: int) -> dict[str, int]:
    """A memory file's tensors against the model: exactly the expected names, each with the dtype and
    shape the config, the counters and the batch imply (activations in `act`, the model's float dtype;
    None = any float dtype, the same for all), every value finite. -> the counters."""
    counters = memory_counters(meta, config, path)
    hidden = entries.get("hidden")
    if hidden is None or len(hidden["shape"]) != 3 or not 1 <= hidden["shape"][0] <= MAX_BATCH:
        raise CheckpointError(f"{path}: memory tensor hidden is missing or not [batch, offset, d_model]")
    act = act or hidden["dtype"]
    if act not in FLOAT_TAGS:
        raise CheckpointError(f"{path}: memory tensor hidden has dtype {hidden['dtype']}; expected "
                              f"{' / '.join(FLOAT_TAGS)}")
    past = 0
    first_attn = next((i for i, k in enumerate(config.layer_types) if k == "A"), None)
    if first_attn is not None and f"past_k.{first_attn}" in entries:
        shape = entries[f"past_k.{first_attn}"]["shape"]
        past = shape[1] if len(shape) == 4 else -1
        limit = config.window - 1 if config.eviction == "sliding" else 0
        if not 0 <= past <= min(limit, counters["seen"] - counters["offset"]):
            raise CheckpointError(f"{path}: memory tensor past_k.{first_attn} holds {past} kept tokens; "
                                  f"{config.eviction} eviction keeps at most {limit}")
    expected = memory_shapes(config, counters, hidden["shape"][0], past, act)
    missing = sorted(set(expected) - set(entries))
    if missing:
        raise CheckpointError(f"{path}: memory tensor {missing[0]} is missing")
    extra = sorted(set(entries) - set(expected))
    if extra:
        raise CheckpointError(f"{path}: unexpected memory tensor {shown_name(extra[0])} "
                              "(not part of this model's state)")
    for name, (dtype, shape) in expected.items():
        got = entries[name]
        if got["dtype"] != dtype or tuple(got["shape"]) != shape:
            raise CheckpointError(f"{path}: memory tensor {name} is {got['dtype']} {list(got['shape'])}, "
                                  f"the model needs {dtype} {list(shape)}")
    check_finite(path, entries, start)
    return counters


# --- task files -----------------------------------------------------------------------------------

def task_file(folder: str | os.PathLike, recorded) -> str:
    """A data path recorded in config.json's task: resolved relative to the model folder and refused when
    it leads outside it (a path the user passes on the command line is not checked here)."""
    where = f"{Path(folder) / 'config.json'}: task.params.path"
    if not isinstance(recorded, str) or not recorded or "\x00" in recorded:
        raise CheckpointError(f"{where}={shown(recorded)} is not a file path")
    root = Path(folder).resolve()
    target = (root / recorded).resolve()
    if not target.is_relative_to(root):
        raise CheckpointError(f"{where}={shown(recorded)} lies outside the model folder; name the data file "
                              "on the command line (lmsleep eval --data FILE)")
    regular_file(target, root, "task data file")
    return str(target)


__all__ = ["CheckpointError", "DTYPE_SIZES", "FLOAT_TAGS", "QUANT_BITS", "QUANT_GROUP_SIZES", "MAX_JSON_BYTES",
           "MAX_HEADER_BYTES", "regular_file", "plain_name", "parse_json", "read_json", "read_text",
           "read_safetensors", "check_header", "check_index", "check_dtypes", "check_quantization",
           "check_tokenizer_block", "check_tokenizer", "check_companions", "check_finite", "memory_counters",
           "memory_shapes", "check_memory", "task_file", "shown", "shown_name", "LIMITS"]
