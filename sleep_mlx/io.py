"""save / load of model folders (SPEC section 5) with MLX's safetensors support.

The format itself (config.json, canonical names and shapes, shards, validation, atomic writes)
lives in common.checkpoint; this file only moves arrays between MLX and safetensors files.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from common import checkpoint as ckpt
from common import validate
from common.tokenizers import tokenizer_from_dict
from sleep_mlx.model import HybridLM

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_DTYPE_NAMES = {tag: name for name, tag in ckpt.DTYPE_TAGS.items()}  # "BF16" -> "bfloat16"


def save(model: HybridLM, path: str | os.PathLike, *, dtype: str | None = None, shard_size: int | None = None,
         overwrite: bool = False, tokenizer: dict | None = None, **extra) -> None:
    """Write `model` as a model folder. dtype: None keeps the parameters' dtype; shard_size in bytes."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    params = dict(tree_flatten(model.parameters()))
    tensors = {name: params[name].astype(DTYPES[dtype]) if dtype else params[name]
               for name in ckpt.param_shapes(model.config)}  # canonical order: same shards as torch
    files = ckpt.companion_files(getattr(model, "tokenizer", None), getattr(model, "chat_template", None))
    if tokenizer is None and getattr(model, "tokenizer", None) is not None:
        tokenizer = model.tokenizer.to_dict()
    write_tensors(path, tensors, ckpt.config_document(model.config, tokenizer, **extra),
                  shard_size=shard_size, overwrite=overwrite, files=files)


def write_tensors(path, tensors: dict[str, mx.array], config_doc: dict, *, shard_size=None,
                  overwrite=False, files: dict[str, str] | None = None) -> None:
    """Atomically write a folder: config.json + safetensors shards (+ index when sharded) + `files`
    (name -> text: a pretrained tokenizer's tokenizer.json, the chat template)."""
    sizes = {n: t.nbytes for n, t in tensors.items()}
    shards = ckpt.plan_shards(sizes, shard_size)
    with ckpt.atomic_folder(path, overwrite=overwrite) as tmp:
        for names, fname in zip(shards, ckpt.shard_names(len(shards))):
            mx.save_safetensors(str(tmp / fname), {n: tensors[n] for n in names},
                                metadata={"format": ckpt.FORMAT, "backend": "mlx"})
        if len(shards) > 1:
            ckpt.write_json(tmp / ckpt.INDEX_FILE, ckpt.index_document(shards, sum(sizes.values())))
        ckpt.write_json(tmp / ckpt.CONFIG_FILE, config_doc)
        ckpt.write_companions(tmp, files or {})


def read_tensors(path, checked: tuple | None = None) -> tuple[dict, dict[str, mx.array]]:
    """Validate a folder (unless `checked`, validate_folder's result, says it was) and read every tensor
    -> (config.json document, {name: array})."""
    _, doc, where = checked or ckpt.validate_folder(path)
    tensors = {}
    for f in sorted(set(where.values())):
        tensors.update(mx.load(str(f), format="safetensors"))
    return doc, tensors


def load(path: str | os.PathLike, *, dtype: str | None = None) -> HybridLM:
    """Load a model folder written by either backend. dtype None keeps the stored dtype.

    Everything is checked before a tensor is read (common.checkpoint.check_folder: files, headers, one
    float dtype, finite values); the tokenizer must fit the model's vocabulary."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    config, doc, where, stored = ckpt.check_folder(path)
    dtype = DTYPES[dtype or _DTYPE_NAMES[stored]]
    if doc.get("quantization"):
        return _load_quantized(path, config, doc, where, dtype)
    _, tensors = read_tensors(path, (config, doc, where))
    model = HybridLM(config, seed=None)
    model.set_dtype(dtype)
    model.load_arrays(tensors)
    return _finish(model, doc, path)


def _finish(model: HybridLM, doc: dict, path) -> HybridLM:
    """Attach the folder's tokenizer (it must fit the model's vocabulary) and chat template."""
    model.tokenizer = tokenizer_from_dict(doc["tokenizer"], path) if doc.get("tokenizer") else None
    validate.check_tokenizer(model.tokenizer, model.config.vocab_size, path)
    model.chat_template = ckpt.read_chat_template(path)
    return model


# --- quantized folders (written by convert/quantize.py) -------------------------------------------------

def _load_quantized(path, config, doc: dict, where: dict, dtype) -> HybridLM:
    """Build the model, swap exactly the listed layers for nn.QuantizedLinear, then load the packed weights.
    (check_folder has checked the quantization block, the listed layers and the packed shapes.)"""
    bits, group, layers = validate.check_quantization(doc["quantization"], path)
    model = HybridLM(config, seed=None)
    linear = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if not set(layers) <= linear:
        raise ckpt.CheckpointError(f"{path}: quantized folders must list the linear layers they quantize "
                                   f"(config.json quantization.layers has {sorted(set(layers) - linear)[0]!r})")
    _, tensors = read_tensors(path, (config, doc, where))
    model.set_dtype(dtype)  # floats only: packed stay uint32
    listed = set(layers)
    nn.quantize(model, group_size=group, bits=bits, class_predicate=lambda name, m: name in listed)
    model.load_arrays(tensors)
    return _finish(model, doc, path)
