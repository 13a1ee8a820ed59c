"""Memory files: a streaming State saved as safetensors (SPEC section 3), readable by both backends.

A memory file holds the State's tensors under the names `{field}.{block}` (and `hidden`), and in
its safetensors metadata the format tag, the window counters and a fingerprint of the model (a
hash of its config and float32 weights), so a memory is never loaded into a model it was not
written by. The backends only convert tensors; the layout and the checks live here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import numpy as np

from common.checkpoint import CheckpointError, read_header, read_metadata
from common.config import ModelConfig

MEMORY_FORMAT = "lm-sleep-memory"
MEMORY_VERSION = 1
LIST_FIELDS = ("committed", "running", "conv", "past_k", "past_v", "cur_k", "cur_v")
INT_FIELDS = ("offset", "due", "seen", "sleeps")


def fingerprint(config: ModelConfig, named_arrays: Iterable[tuple[str, np.ndarray]]) -> str:
    """sha256 of the config and of every weight as float32, in name order (backend-independent)."""
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    for name, array in sorted(named_arrays, key=lambda kv: kv[0]):
        a = np.ascontiguousarray(np.asarray(array, dtype=np.float32))
        h.update(f"{name}:{list(a.shape)}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def state_to_named(lists: dict[str, list], hidden, counters: dict[str, int], model_hash: str):
    """State pieces -> ({name: tensor}, safetensors metadata of strings)."""
    tensors = {f"{field}.{i}": t for field in LIST_FIELDS for i, t in enumerate(lists[field]) if t is not None}
    tensors["hidden"] = hidden
    meta = {"format": MEMORY_FORMAT, "format_version": str(MEMORY_VERSION), "model_hash": model_hash,
            "n_layers": str(len(lists["committed"]))}
    meta.update({k: str(int(counters[k])) for k in INT_FIELDS})
    return tensors, meta


def check_memory_file(path, model_hash: str) -> dict[str, int]:
    """Validate a memory file's header against a model -> its counters; one-line errors."""
    try:
        read_header(path)
        meta = read_metadata(path)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: not a readable memory file ({e})") from None
    if meta.get("format") != MEMORY_FORMAT:
        raise CheckpointError(f"{path}: not an lm-sleep memory file (format {meta.get('format')!r})")
    if meta.get("format_version") != str(MEMORY_VERSION):
        raise CheckpointError(f"{path}: memory format_version {meta.get('format_version')!r} is not supported")
    if meta.get("model_hash") != model_hash:
        raise CheckpointError(f"{path}: this memory was written by another model (weights or config differ)")
    return {k: int(meta[k]) for k in INT_FIELDS} | {"n_layers": int(meta["n_layers"])}


def named_to_lists(tensors: dict, n_layers: int) -> tuple[dict[str, list], object]:
    """{name: tensor} -> (field -> per-block list with None gaps, hidden)."""
    lists = {field: [tensors.get(f"{field}.{i}") for i in range(n_layers)] for field in LIST_FIELDS}
    return lists, tensors["hidden"]
