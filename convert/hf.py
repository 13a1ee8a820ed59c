"""Read a Hugging Face model folder (config.json + safetensors + tokenizer files) as a retrofit source.

    source = read_hf_folder("path/to/SmolLM2-135M-Instruct")
    source.arch        # common.pretrained.SourceArch
    source.tensors     # {"model.layers.0.self_attn.q_proj.weight": float32 ndarray, ...} (Hugging Face names)
    source.files       # {"tokenizer.json": text, "tokenizer_config.json": text, "chat_template.jinja": text, ...}

Only safetensors are read (a single model.safetensors or shards listed by model.safetensors.index.json; every shard
must lie inside the folder and the index must agree with the shards' own headers); pickle weights (.bin, .pt) are
refused, and so is anything common.pretrained.from_hf_config refuses. Headers are read and checked by the project's
one reader (common.checkpoint.read_safetensors) and each tensor read with numpy (bf16 widened through its bit
pattern), so no framework is needed; NaN or infinite weights are refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common import validate
from common.checkpoint import read_safetensors
from common.pretrained import SourceArch, check_hf_tensors, expected_hf_shapes, from_hf_config

# The tokenizer and chat files a retrofit carries over (those present are read as text).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_FLOAT_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}


@dataclass
class Source:
    """A pretrained checkpoint in memory: architecture, Hugging Face-named float32 tensors, tokenizer files."""

    arch: SourceArch
    tensors: dict[str, np.ndarray]
    files: dict[str, str] = field(default_factory=dict)  # file name -> text, written unchanged into a model folder
    origin: dict = field(default_factory=dict)            # {"format": "hf"|"gguf", "path": ..., ...} for the record

    @property
    def chat_template(self) -> str | None:
        return chat_template_from_files(self.files)


def chat_template_from_files(files: dict[str, str]) -> str | None:
    """The default chat template, looked up in transformers' order: chat_template.jinja, chat_template.json,
    then tokenizer_config.json's "chat_template" (a string, or a list of {"name", "template"}: the "default")."""
    if "chat_template.jinja" in files:
        return files["chat_template.jinja"]
    for name in ("chat_template.json", "tokenizer_config.json"):
        if name in files:
            doc = validate.parse_json(files[name], name)
            template = doc.get("chat_template") if isinstance(doc, dict) else None
            if isinstance(template, list):
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                template = named.get("default")
            if isinstance(template, str):
                return template
    return None


# ---------------------------------------------------------------- safetensors without a framework

def _read_tensor(path: Path, entry: dict, start: int, name: str, dtype) -> np.ndarray:
    tag = entry["dtype"]
    if tag not in _FLOAT_DTYPES:
        raise ValueError(f"{path.name}: tensor {name!r} has dtype {tag}; only F64/F32/F16/BF16 weights are read")
    begin, end = entry["data_offsets"]
    raw = np.fromfile(path, dtype=np.uint8, count=end - begin, offset=start + begin)
    values = raw.view(np.dtype(_FLOAT_DTYPES[tag]).newbyteorder("<"))
    if tag == "BF16":  # bf16 is the top half of a float32
        values = (values.astype(np.uint32) << 16).view(np.float32)
    values = values.reshape(entry["shape"]).astype(dtype, copy=False)  # the header check fixed the byte count
    if not np.isfinite(values).all():
        raise ValueError(f"{path.name}: tensor {name!r} holds NaN or infinite values")
    return values


def _inside(folder: Path, rel: str, what: str) -> Path:
    """A shard named by the index: a relative path to a regular file inside the folder (a link only when
    its target stays inside; common.validate.regular_file looks before anything opens it)."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or os.path.isabs(rel) or ".." in Path(rel).parts:
        raise ValueError(f"{what}: shard name {rel!r} must be a relative path inside the folder")
    path = folder / rel
    if not os.path.lexists(path):
        raise ValueError(f"{what}: shard {rel!r} is missing")
    return validate.regular_file(path, folder, f"shard named by {what}")


def _weight_files(folder: Path) -> dict[str, tuple[Path, dict, int]]:
    """{tensor name: (file, header entry, data start)} for the folder's safetensors weights."""
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if os.path.lexists(index):
        doc = validate.read_json(index, "shard index", folder)
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index.name}: weight_map must be a non-empty mapping")
        shards = {rel: _inside(folder, rel, index.name) for rel in sorted(set(weight_map.values()))}
        out = {}
        for rel, path in shards.items():
            header, _, start = read_safetensors(path, folder)
            for name, entry in header.items():
                if weight_map.get(name) != rel:
                    raise ValueError(f"{index.name}: tensor {name!r} lies in {rel!r} but weight_map says "
                                     f"{weight_map.get(name)!r}")
                out[name] = (path, entry, start)
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise ValueError(f"{index.name}: tensor {missing[0]!r} is not in its shard {weight_map[missing[0]]!r}")
        return out
    if os.path.lexists(single):
        header, _, start = read_safetensors(single, folder)
        return {name: (single, entry, start) for name, entry in header.items()}
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{folder}: only {pickles[0]} found: pickle weights are not loaded; convert to safetensors")
    raise ValueError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def read_hf_folder(folder: str | os.PathLike, *, dtype=np.float32, load_tensors: bool = True) -> Source:
    """A Hugging Face model folder as a Source (tensors cast to `dtype`; empty with load_tensors=False)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a directory")
    config_path = folder / "config.json"
    if not os.path.lexists(config_path):
        raise ValueError(f"{folder}: no config.json")
    config = validate.read_json(config_path, "Hugging Face config.json", folder)
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    arch = from_hf_config(config)
    located = _weight_files(folder)
    check_hf_tensors(arch, {name: tuple(entry["shape"]) for name, (_, entry, _) in located.items()})
    tensors = {}
    if load_tensors:  # the expected ones only: a tied lm_head copy and rotary inv_freq buffers are dropped
        for name in expected_hf_shapes(arch):
            path, entry, start = located[name]
            tensors[name] = _read_tensor(path, entry, start, name, dtype)
    files = {name: validate.read_text(folder / name, name, folder) for name in TOKENIZER_FILES
             if os.path.lexists(folder / name)}
    return Source(arch=arch, tensors=tensors, files=files, origin={"format": "hf", "path": str(folder)})


__all__ = ["Source", "read_hf_folder", "chat_template_from_files", "TOKENIZER_FILES"]
