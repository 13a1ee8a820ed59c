"""Raw safetensors I/O and float casts in numpy: tensors move between files as bytes.

A conversion that keeps the dtype must be bit-exact, bf16 included, and numpy has no bfloat16. So
tensors travel as `Raw(dtype tag, shape, bytes)` read straight from the file (header read by
common.checkpoint.read_safetensors, data sliced, never decoded) and are written back by a tiny
safetensors writer. Only a requested dtype cast decodes them: F32 <-> BF16 <-> F16 on bit patterns,
bf16 rounded to nearest even (exactly what torch's `.to(torch.bfloat16)` does for finite values and infinities; NaN stays NaN).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import checkpoint as ckpt

DTYPE_TAGS = ckpt.DTYPE_TAGS  # config / CLI dtype name -> safetensors tag (one list, in common/checkpoint.py)
FLOAT_TAGS = ("F32", "BF16", "F16")
# safetensors tag -> numpy dtype holding the same bytes (BF16 as its uint16 bit pattern)
NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
                "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U32": np.uint32, "BOOL": np.bool_}


@dataclass(frozen=True)
class Raw:
    """One tensor as it lies in a safetensors file: dtype tag, shape and little-endian bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    @property
    def nbytes(self) -> int:
        return len(self.data)


# --- safetensors files as bytes --------------------------------------------------------------------

def read_raw(path: str | os.PathLike) -> tuple[dict[str, Raw], dict]:
    """{name: Raw} in file order and the `__metadata__` of a safetensors file. The header is checked by
    common.checkpoint.read_safetensors (a regular file; known dtypes; offsets that tile the data exactly,
    none negative or overlapping; byte counts equal to shape x dtype size), so the slices below are exact."""
    path = Path(path)
    header, meta, start = ckpt.read_safetensors(path)
    with open(path, "rb") as f:
        blob = f.read()
    tensors = {}
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
        begin, end = info["data_offsets"]
        tensors[name] = Raw(info["dtype"], tuple(info["shape"]), blob[start + begin:start + end])
    return tensors, meta


def write_raw(path: str | os.PathLike, tensors: dict[str, Raw], metadata: dict[str, str]) -> None:
    """Write a safetensors file. Wider dtypes first (then the given order) keep every tensor aligned."""
    order = sorted(tensors, key=lambda name: -ckpt.DTYPE_SIZES[tensors[name].dtype])  # stable
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        header[name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in order:
            f.write(tensors[name].data)


# --- decode / encode ---------------------------------------------------------------------------------

def to_numpy(t: Raw) -> np.ndarray:
    """The tensor as numpy; BF16 widens exactly to float32 (numpy has no bfloat16)."""
    a = np.frombuffer(t.data, dtype=np.dtype(NUMPY_DTYPES[t.dtype]).newbyteorder("<")).reshape(t.shape)
    return bf16_bits_to_f32(a) if t.dtype == "BF16" else a.astype(a.dtype.newbyteorder("="))


def from_numpy(a: np.ndarray, dtype: str) -> Raw:
    """numpy -> Raw with tag `dtype`; float tags round (bf16 to nearest even), others must match."""
    a = np.asarray(a)
    if dtype == "BF16":
        a = a if a.dtype == np.uint16 else f32_to_bf16_bits(a.astype(np.float32))
    elif dtype in FLOAT_TAGS:
        a = a.astype(NUMPY_DTYPES[dtype])
    else:
        assert a.dtype == NUMPY_DTYPES[dtype], (a.dtype, dtype)
    a = np.ascontiguousarray(a, dtype=np.dtype(a.dtype).newbyteorder("<"))
    return Raw(dtype, tuple(a.shape), a.tobytes())


def cast(t: Raw, dtype: str) -> Raw:
    """Cast a float tensor to another float tag; same tag (or a non-float tensor) comes back untouched."""
    if t.dtype == dtype or t.dtype not in FLOAT_TAGS:
        return t
    # Widening to float32 is exact for all three, so each cast rounds exactly once.
    return from_numpy(to_numpy(t).astype(np.float32), dtype)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest, ties to even; NaN stays a (quiet) NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16  # carries into the exponent as it should
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    quiet = (bits >> 16) | 0x0040  # keep sign and top payload bits; a NaN must not round to infinity
    return np.where(nan, quiet, rounded).astype(np.uint16)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32)


__all__ = ["Raw", "DTYPE_TAGS", "FLOAT_TAGS", "read_raw", "write_raw", "to_numpy", "from_numpy", "cast",
           "f32_to_bf16_bits", "bf16_bits_to_f32"]
