"""save / load of model folders (SPEC section 5) with MLX's safetensors support.

The format itself (config.json, canonical names and shapes, shards, validation, atomic writes)
lives in common.checkpoint; this file only moves arrays between MLX and safetensors files.
"""

from __future__ import annotations

import os

import mlx.core as mx
from mlx.utils import tree_flatten

from common import checkpoint as ckpt
from common.tokenizers import tokenizer_from_dict
from sleep_mlx.model import HybridLM

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def save(model: HybridLM, path: str | os.PathLike, *, dtype: str | None = None, shard_size: int | None = None,
         overwrite: bool = False, tokenizer: dict | None = None, **extra) -> None:
    """Write `model` as a model folder. dtype: None keeps the parameters' dtype; shard_size in bytes."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    params = dict(tree_flatten(model.parameters()))
    tensors = {name: params[name].astype(DTYPES[dtype]) if dtype else params[name]
               for name in ckpt.param_shapes(model.config)}  # canonical order: same shards as torch
    if tokenizer is None and getattr(model, "tokenizer", None) is not None:
        tokenizer = model.tokenizer.to_dict()
    write_tensors(path, tensors, ckpt.config_document(model.config, tokenizer, **extra),
                  shard_size=shard_size, overwrite=overwrite)


def write_tensors(path, tensors: dict[str, mx.array], config_doc: dict, *, shard_size=None,
                  overwrite=False) -> None:
    """Atomically write a folder: config.json + safetensors shards (+ index when sharded)."""
    sizes = {n: t.nbytes for n, t in tensors.items()}
    shards = ckpt.plan_shards(sizes, shard_size)
    with ckpt.atomic_folder(path, overwrite=overwrite) as tmp:
        for names, fname in zip(shards, ckpt.shard_names(len(shards))):
            mx.save_safetensors(str(tmp / fname), {n: tensors[n] for n in names},
                                metadata={"format": ckpt.FORMAT, "backend": "mlx"})
        if len(shards) > 1:
            ckpt.write_json(tmp / ckpt.INDEX_FILE, ckpt.index_document(shards, sum(sizes.values())))
        ckpt.write_json(tmp / ckpt.CONFIG_FILE, config_doc)


def read_tensors(path) -> tuple[dict, dict[str, mx.array]]:
    """Validate a folder and read every tensor -> (config.json document, {name: array})."""
    _, doc, where = ckpt.validate_folder(path)
    tensors = {}
    for f in sorted(set(where.values())):
        tensors.update(mx.load(str(f)))
    return doc, tensors


def load(path: str | os.PathLike, *, dtype: str | None = None) -> HybridLM:
    """Load a model folder written by either backend. dtype None keeps the stored dtype."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    config, doc, _ = ckpt.validate_folder(path)
    if doc.get("quantization"):
        raise ckpt.CheckpointError(f"{path}: quantized folders are not supported by sleep_mlx.load yet "
                                   "(coming with the converter)")
    _, tensors = read_tensors(path)
    model = HybridLM(config, seed=None)
    stored = next(iter(tensors.values())).dtype
    model.set_dtype(DTYPES[dtype] if dtype else stored)
    model.load_arrays(tensors)
    model.tokenizer = tokenizer_from_dict(doc["tokenizer"]) if doc.get("tokenizer") else None
    return model
