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

from common import validate
from common.validate import CheckpointError, read_safetensors
from common.config import ModelConfig
from common.sleep import CACHE_OF_KIND, State

MEMORY_FORMAT = "lm-sleep-memory"
MEMORY_VERSION = 2  # 2: attention keys stored rotated at their window positions (1: unrotated, still read)
READABLE_VERSIONS = ("1", "2")
INT_FIELDS = State.COUNTERS  # ("offset", "due", "seen", "sleeps")


def fingerprint(config: ModelConfig, named_arrays: Iterable[tuple[str, np.ndarray]]) -> str:
    """sha256 of the config and of every weight as float32, in name order (backend-independent)."""
    h = hashlib.sha256(json.dumps(config.fingerprint_dict(), sort_keys=True).encode())
    for name, array in sorted(named_arrays, key=lambda kv: kv[0]):
        a = np.ascontiguousarray(np.asarray(array, dtype=np.float32))
        h.update(f"{name}:{list(a.shape)}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def remembered_fingerprint(model, params: list[tuple[str, object]], version, to_numpy) -> str:
    """`fingerprint` of a model, recomputed only when its config or a parameter changed.

    The key is the config and each parameter's identity and version (`version(p)`: torch's in-place
    counter; MLX arrays are immutable, so an update is a new array). The memo holds the parameters
    themselves, so an identity cannot be reused by another array while it is remembered. Hashing a
    135M-parameter model takes about a second; a server writes a memory file per reply.
    """
    key = (model.config, tuple((name, id(p), version(p)) for name, p in params))
    memo = getattr(model, "_fingerprint_memo", None)
    if memo is None or memo[0] != key:
        value = fingerprint(model.config, ((name, to_numpy(p)) for name, p in params))
        memo = (key, [p for _, p in params], value)
        object.__setattr__(model, "_fingerprint_memo", memo)
    return memo[2]


def state_to_named(state: State, model_hash: str):
    """A State -> ({name: tensor}, safetensors metadata of strings).

    Tensor names are `{field}.{block}` (the cache field, e.g. `past_k.0`, `committed.1`) and `hidden`;
    empty fields (a conv tail at a window start) are left out.
    """
    tensors = {f"{field}.{i}": t for i, cache in enumerate(state.caches) for field, t in cache.named().items()}
    tensors["hidden"] = state.hidden
    meta = {"format": MEMORY_FORMAT, "format_version": str(MEMORY_VERSION), "model_hash": model_hash,
            "n_layers": str(len(state.caches))}
    meta.update({k: str(int(v)) for k, v in state.counters().items()})
    return tensors, meta


def check_memory_file(path, model_hash: str, config: ModelConfig, dtype: str | None = None) -> dict[str, int]:
    """Validate a memory file against a model -> its counters; one-line CheckpointErrors.

    Checks the format tag, the version and the model fingerprint, and with `config` everything else
    (common.validate.check_memory): bounded, consistent counters; exactly the tensors this model's
    State holds, each with the shape and dtype the config implies (`dtype`: the model's float tag for
    keys, values, conv tails and hidden states, None = any one float tag; SSM states are F32); every
    value finite.
    """
    try:
        entries, meta, start = read_safetensors(path)
    except (OSError, ValueError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0].removeprefix(f"{path}: ")
        raise CheckpointError(f"{path}: not a readable memory file ({why})") from None
    if meta.get("format") != MEMORY_FORMAT:
        raise CheckpointError(f"{path}: not an lm-sleep memory file (format {validate.shown(meta.get('format'))})")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: memory format_version {validate.shown(meta.get('format_version'))} "
                              "is not supported")
    if meta.get("model_hash") != model_hash:
        raise CheckpointError(f"{path}: this memory was written by another model (weights or config differ)")
    counters = validate.check_memory(path, entries, meta, config, dtype, start)
    return {**counters, "format_version": int(meta["format_version"])}


def named_to_state(tensors: dict, layer_types: str, counters: dict[str, int], cat) -> State:
    """{name: tensor} (as written by `state_to_named`) -> a State with one cache per block kind.

    `cat` is torch.cat / mx.concatenate. Attention keys come back as the file holds them: rotated
    (format_version 2) or unrotated (1: the backend rotates them, see HybridLM.load_state)."""
    if counters.get("n_layers", len(layer_types)) != len(layer_types):
        raise CheckpointError(f"memory file has {counters['n_layers']} blocks, the model {len(layer_types)}")
    caches = []
    for i, kind in enumerate(layer_types):
        cls = CACHE_OF_KIND[kind]
        fields = {f: tensors.get(f"{f}.{i}") for f in cls.FIELDS}
        caches.append(cls.from_named(fields, cat) if hasattr(cls, "from_named") else cls(**fields))
    return State(caches=caches, hidden=tensors["hidden"], **{k: counters[k] for k in INT_FIELDS})


def rotate_v1_keys(state: State, layers, version: int) -> State:
    """Format-version-1 memory files hold attention keys unrotated: rotate them at their window positions
    with each attention block's own table (`attn.rotated`), so the State is what version 2 stores."""
    if version == 1:
        state.caches = [block.attn.rotated(cache) if block.kind == "A" else cache
                        for block, cache in zip(layers, state.caches)]
    return state
