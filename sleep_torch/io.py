"""save / load of model folders (SPEC section 5) with torch's safetensors support.

The format itself (config.json, canonical names and shapes, shards, validation, atomic writes)
lives in common.checkpoint; this file only moves tensors between torch and safetensors files.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file

from common import checkpoint as ckpt
from common import validate
from common.tokenizers import tokenizer_from_dict
from sleep_torch.model import HybridLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_NAMES = {tag: name for name, tag in ckpt.DTYPE_TAGS.items()}  # "BF16" -> "bfloat16"


def save(model: HybridLM, path: str | os.PathLike, *, dtype: str | None = None, shard_size: int | None = None,
         overwrite: bool = False, tokenizer: dict | None = None, **extra) -> None:
    """Write `model` as a model folder. dtype: None keeps the parameters' dtype; shard_size in bytes."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    tensors = {name: (p.detach().to(DTYPES[dtype]) if dtype else p.detach()).cpu().contiguous()
               for name, p in model.named_parameters()}
    files = ckpt.companion_files(getattr(model, "tokenizer", None), getattr(model, "chat_template", None))
    if tokenizer is None and getattr(model, "tokenizer", None) is not None:
        tokenizer = model.tokenizer.to_dict()
    write_tensors(path, tensors, ckpt.config_document(model.config, tokenizer, **extra),
                  shard_size=shard_size, overwrite=overwrite, files=files)


def write_tensors(path, tensors: dict[str, torch.Tensor], config_doc: dict, *, shard_size=None,
                  overwrite=False, files: dict[str, str] | None = None) -> None:
    """Atomically write a folder: config.json + safetensors shards (+ index when sharded) + `files`
    (name -> text: a pretrained tokenizer's tokenizer.json, the chat template)."""
    sizes = {n: t.numel() * t.element_size() for n, t in tensors.items()}
    shards = ckpt.plan_shards(sizes, shard_size)
    with ckpt.atomic_folder(path, overwrite=overwrite) as tmp:
        for names, fname in zip(shards, ckpt.shard_names(len(shards))):
            save_file({n: tensors[n] for n in names}, str(tmp / fname),
                      metadata={"format": ckpt.FORMAT, "backend": "torch"})
        if len(shards) > 1:
            ckpt.write_json(tmp / ckpt.INDEX_FILE, ckpt.index_document(shards, sum(sizes.values())))
        ckpt.write_json(tmp / ckpt.CONFIG_FILE, config_doc)
        ckpt.write_companions(tmp, files or {})


def read_tensors(path, checked: tuple | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Validate a folder (unless `checked`, validate_folder's result, says it was) and read every tensor
    -> (config.json document, {name: tensor})."""
    _, doc, where = checked or ckpt.validate_folder(path)
    tensors = {}
    for f in sorted(set(where.values())):
        tensors.update(load_file(str(f)))
    return doc, tensors


def load(path: str | os.PathLike, *, dtype: str | None = None, device: str | torch.device | None = None) -> HybridLM:
    """Load a model folder written by either backend. dtype None keeps the stored dtype.

    Everything is checked before a tensor is read (common.checkpoint.check_folder: files, headers, one
    float dtype, finite values); the tokenizer must fit the model's vocabulary."""
    ckpt.check_dtype(dtype)
    config, doc, where, stored = ckpt.check_folder(path)
    if doc.get("quantization"):
        raise ckpt.CheckpointError(f"{path}: quantized folders run on the MLX backend; dequantize it with "
                                   "`lmsleep convert --dequantize` to use it with torch")
    _, tensors = read_tensors(path, (config, doc, where))
    model = HybridLM(config, seed=None)
    model.to(DTYPES[dtype or _DTYPE_NAMES[stored]])
    model.load_arrays(tensors)
    _finish(model, doc, path)
    return model.to(device) if device is not None else model


def _finish(model: HybridLM, doc: dict, path) -> HybridLM:
    """Attach the folder's tokenizer (it must fit the model's vocabulary) and chat template."""
    model.tokenizer = tokenizer_from_dict(doc["tokenizer"], path) if doc.get("tokenizer") else None
    validate.check_tokenizer(model.tokenizer, model.config.vocab_size, path)
    model.chat_template = ckpt.read_chat_template(path)
    return model
