"""torch <-> MLX conversion of model folders and training checkpoints (SPEC section 5).

Both backends write the same folder format, so converting a model folder means: validate it, copy
every tensor's bytes unchanged (bf16 stays bit-exact: nothing goes through float32 unless a cast is
asked for), set the safetensors metadata "backend" to the target, and optionally cast the float
dtype, quantize (for MLX) or dequantize (for torch).

A trainer checkpoint (out_dir/checkpoint) converts to a trainer checkpoint of the other backend
that resumes exactly: both trainers write one optimizer layout (common/training.py), so weights and
optimizer tensors are copied byte for byte, optimizer.json unchanged, and trainer_state.json gets the
target backend, "converted_from" and an empty RNG state (torch's and MLX's generators cannot take each
other's state). With a dtype cast, or from bare weights (any safetensors file/folder with a
config.json), the result is a clean model folder: optimizer state dropped, `module.` (DDP) and
`_orig_mod.` (torch.compile) name prefixes stripped. A checkpoint of frozen-base fine-tuning (config.json
"base": the init folder and the sha256 of its weights) holds only the trained tensors: it converts as it is
(still resumable, still referring to its base), and into a clean model folder with the frozen tensors read
back from the base folder (refused when that folder's weights no longer match the sha256).

    convert_model("runs/r110/model", "runs/r110/model-mlx-q4", to="mlx", quantize_bits=4)
    convert_training_checkpoint("runs/r110/checkpoint", "runs/r110-mlx/checkpoint", to="mlx")  # resumable
    convert_training_checkpoint("runs/r110/checkpoint", "runs/r110/model-bf16", to="mlx", dtype="bfloat16")
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from common import backends
from common import checkpoint as ckpt
from common import training as tr
from common.config import ModelConfig
from convert import quantize as qz
from convert.dtypes import DTYPE_TAGS, FLOAT_TAGS, Raw, cast, read_raw, write_raw

QUANTIZED_BACKEND = "mlx"  # the backend whose load() runs quantized folders (the others refuse them)
PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def convert_model(src: str | os.PathLike, dst: str | os.PathLike, *, to: str, dtype: str | None = None,
                  quantize_bits: int | None = None, group_size: int = 64, dequantize: bool = False,
                  overwrite: bool = False) -> dict:
    """Convert a model folder for backend `to` (common.backends.names()); returns a report (see `summary`)."""
    _check_args(to, dtype, overwrite, src, dst)
    if quantize_bits is not None:
        if to != QUANTIZED_BACKEND:
            raise ValueError(f"quantized folders run on the {QUANTIZED_BACKEND} backend: quantize with "
                             f"to={QUANTIZED_BACKEND!r} (--to {QUANTIZED_BACKEND})")
        qz.check_settings(quantize_bits, group_size)
    config, doc, where = ckpt.validate_folder(src)
    quant = doc.get("quantization")
    if quant and to != QUANTIZED_BACKEND and not dequantize:
        raise ckpt.CheckpointError(f"{src}: quantized folders run on the {QUANTIZED_BACKEND} backend; pass "
                                   f"dequantize=True (`lmsleep convert --dequantize`) to convert it for {to}")
    if quant and quantize_bits is not None:
        raise ValueError(f"{src}: already quantized ({quant['bits']}-bit); quantize the unquantized model instead")
    tensors, file_of, meta = _read_folder(src, where, config, quant)
    doc = dict(doc)
    if quant and dequantize:
        tensors = qz.dequantize_tensors(tensors, quant)
        del doc["quantization"]
    if dtype is not None:
        tensors = {n: cast(t, DTYPE_TAGS[dtype]) for n, t in tensors.items()}
    if quantize_bits is not None:
        layers = qz.quantizable_layers(config, group_size)
        if not layers:
            raise ValueError(f"no layer has an input size divisible by group_size {group_size} "
                             f"(d_model={config.d_model}); choose a smaller group size")
        tensors = qz.quantize_tensors(tensors, layers, quantize_bits, group_size)
        for name in tensors:  # scales/biases live in the same shard as their weight
            if name not in file_of:
                file_of[name] = file_of[name.rsplit(".", 1)[0] + ".weight"]
        doc["quantization"] = {"bits": quantize_bits, "group_size": group_size, "layers": layers}
    _write_folder(dst, tensors, file_of, doc, {**meta, "format": ckpt.FORMAT, "backend": to}, overwrite,
                  companions=ckpt.read_companions(src, doc))
    report = _report("model", src, dst, to, tensors, doc.get("quantization"))
    if quantize_bits is not None:
        report["quantization_error"] = qz.quantization_error(src, dst)
    return report


def convert_training_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, to: str,
                                dtype: str | None = None, overwrite: bool = False) -> dict:
    """A trainer checkpoint -> a trainer checkpoint for backend `to` that resumes there exactly (weights,
    optimizer state, step = schedule and data position; not the RNG state when the backend changes).
    With `dtype`, or from bare weights (any safetensors file/folder with a config.json) -> a clean
    model folder (optimizer state dropped)."""
    _check_args(to, dtype, overwrite, src, dst)
    src = Path(src)
    resumable = dtype is None and src.is_dir() and (src / tr.TRAINER_STATE_FILE).is_file()
    config, extra = _training_config(src)
    expected = ckpt.param_shapes(config)
    tensors: dict[str, Raw] = {}
    origin: dict[str, tuple[str, Path]] = {}  # clean name -> (name in the file, file)
    for f in _training_weight_files(src):
        for name, t in read_raw(f)[0].items():
            clean = strip_prefixes(name)
            if clean in origin:
                raise ckpt.CheckpointError(f"{f}: tensors {origin[clean][0]!r} and {name!r} both become {clean!r}")
            if clean not in expected:
                raise ckpt.CheckpointError(f"{f}: tensor {name!r} is not a weight of this model config "
                                           f"({config.n_layers} layers {config.layer_types}, tie_embeddings="
                                           f"{config.tie_embeddings})")
            if t.shape != expected[clean]:
                raise ckpt.CheckpointError(f"{f}: tensor {name!r} has shape {list(t.shape)}, "
                                           f"config says {list(expected[clean])}")
            if t.dtype not in FLOAT_TAGS:
                raise ckpt.CheckpointError(f"{f}: tensor {name!r} has dtype {t.dtype}, expected a float dtype")
            tensors[clean], origin[clean] = t, (name, f)
    missing = [n for n in expected if n not in tensors]
    base, trained = extra.get(tr.BASE_KEY), None
    if missing and base is not None:
        if resumable:  # stays a frozen-base checkpoint: the trained tensors and the base reference
            trained, expected = [n for n in expected if n in tensors], {n: expected[n] for n in expected if n in tensors}
        else:  # a clean model folder: the whole model
            tag = DTYPE_TAGS[dtype] if dtype else tensors[next(iter(tensors))].dtype
            tensors.update({n: cast(t, tag) for n, t in _base_tensors(base, config, missing).items()})
            extra = {k: v for k, v in extra.items() if k != tr.BASE_KEY}
        missing = []
    if missing:
        raise ckpt.CheckpointError(f"{src}: missing tensor {missing[0]}"
                                   + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    tensors = {n: cast(tensors[n], DTYPE_TAGS[dtype]) if dtype else tensors[n] for n in expected}
    doc = ckpt.config_document(config, **extra)
    meta = {"format": ckpt.FORMAT, "backend": to}
    trainer = _trainer_files(src, config, to, trained) if resumable else None
    extra_files = (lambda tmp: _write_trainer_files(tmp, *trainer, meta)) if trainer else None
    companions = ckpt.read_companions(src if src.is_dir() else src.parent, doc)
    _write_folder(dst, tensors, dict.fromkeys(tensors, ckpt.WEIGHTS_FILE), doc, meta, overwrite, extra_files,
                  companions, check=trained is None)
    report = _report("training checkpoint", src, dst, to, tensors, None)
    if trainer:
        report.update(resumable=True, step=trainer[2]["step"], converted_from=trainer[2].get("converted_from"),
                      optimizer_tensors=len(trainer[0]))
    return report


def convert_path(src, dst, *, to: str, dtype: str | None = None, quantize_bits: int | None = None,
                 group_size: int = 64, dequantize: bool = False, overwrite: bool = False) -> dict:
    """`lmsleep convert`: a model folder or a training checkpoint, whichever `src` is."""
    if detect(src) == "model":
        return convert_model(src, dst, to=to, dtype=dtype, quantize_bits=quantize_bits, group_size=group_size,
                             dequantize=dequantize, overwrite=overwrite)
    if quantize_bits is not None or dequantize:
        raise ValueError(f"{src} is a training checkpoint: convert it to a model folder first, then "
                         "quantize or dequantize that folder")
    return convert_training_checkpoint(src, dst, to=to, dtype=dtype, overwrite=overwrite)


def detect(src) -> str:
    """What `src` is: "model" (a clean model folder) or "training" (a trainer checkpoint, bare weights)."""
    src = Path(src)
    if not src.exists():
        raise ckpt.CheckpointError(f"{src}: no such file or folder")
    if src.is_file() or (src / tr.TRAINER_STATE_FILE).exists() or (src / tr.OPTIMIZER_FILE).exists():
        return "training"
    if not (src / ckpt.CONFIG_FILE).exists():
        return "training"  # no config.json: the training path names what is missing
    try:  # the bounded, regular-file-only reader: a FIFO, /dev/zero or a JSON bomb is a clean error
        doc = ckpt.read_json_file(src / ckpt.CONFIG_FILE, "not an lm-sleep model folder")
    except ckpt.CheckpointError:
        return "model"  # convert_model reports what is wrong with config.json
    if not isinstance(doc, dict) or doc.get("format") != ckpt.FORMAT:
        return "training"
    try:
        names = [n for f in ckpt.weight_files(src) for n in ckpt.read_header(f)]
    except ckpt.CheckpointError:
        return "model"  # convert_model reports what is wrong with the folder
    return "training" if any(n.startswith(PREFIXES) for n in names) else "model"


def strip_prefixes(name: str) -> str:
    """'module._orig_mod.layers.0.norm1.weight' -> 'layers.0.norm1.weight' (any order, any repeat)."""
    while name.startswith(PREFIXES):
        name = name.split(".", 1)[1]
    return name


def summary(report: dict) -> str:
    """One line for the command line."""
    line = (f"converted {report['kind']} {report['src']} -> {report['dst']} for {report['to']}: "
            f"{report['tensors']} tensors, {report['bytes'] / 1e6:.2f} MB, {'/'.join(report['dtypes'])}")
    q = report.get("quantization")
    if q:
        line += f", {q['bits']}-bit group {q['group_size']} on {len(q['layers'])} layers"
    if report.get("resumable"):
        dst = Path(report["dst"])
        where = f"--out {dst.parent}" if dst.name == tr.CHECKPOINT_DIR else f"--out OUT, this folder as OUT/{tr.CHECKPOINT_DIR}"
        line += (f"; optimizer and trainer state (step {report['step']}) kept: resume with --backend {report['to']} "
                 f"--resume {where}")
        if report["converted_from"]:
            line += f" (the {report['converted_from']} RNG state stays behind)"
    return line


# --- helpers -----------------------------------------------------------------------------------------

def _check_args(to, dtype, overwrite, src, dst) -> None:
    if to not in backends.names():
        raise ValueError(f"to must be one of {backends.names()}, got {to!r}")
    if dtype is not None and dtype not in DTYPE_TAGS:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_TAGS)}, got {dtype!r}")
    if Path(src).resolve() == Path(dst).resolve():
        raise ValueError(f"{dst}: the target is the source; write the conversion to another folder")
    if Path(dst).exists() and not overwrite:  # checked before any work; atomic_folder checks again
        raise ckpt.CheckpointError(f"{dst}: already exists (pass overwrite=True / --force to replace it)")


def _read_folder(folder, where: dict[str, Path], config: ModelConfig, quant: dict | None):
    """Every tensor as Raw in canonical order, name -> shard file name, the first file's metadata."""
    tensors, meta = {}, {}
    for f in sorted(set(where.values())):
        raw, file_meta = read_raw(f)
        tensors.update(raw)
        meta = meta or file_meta
    order = list(ckpt.expected_shapes(config, quant))
    return {n: tensors[n] for n in order}, {n: where[n].name for n in order}, meta


def _write_folder(dst, tensors: dict[str, Raw], file_of: dict[str, str], doc: dict, meta: dict,
                  overwrite: bool, extra_files=None, companions: dict[str, str] | None = None,
                  check: bool = True) -> None:
    """Atomically write config.json + the weight files (+ index when sharded), the companion files
    (tokenizer.json, chat template) and whatever extra_files(tmp) writes; validated before it appears."""
    files = list(dict.fromkeys(file_of[n] for n in tensors))
    with ckpt.atomic_folder(dst, overwrite=overwrite) as tmp:
        for fname in files:
            write_raw(tmp / fname, {n: t for n, t in tensors.items() if file_of[n] == fname}, meta)
        if files != [ckpt.WEIGHTS_FILE]:
            index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                     "weight_map": {n: file_of[n] for n in tensors}}
            ckpt.write_json(tmp / ckpt.INDEX_FILE, index)
        ckpt.write_json(tmp / ckpt.CONFIG_FILE, doc)
        ckpt.write_companions(tmp, companions or {})
        if extra_files:
            extra_files(tmp)
        if check:  # not for a frozen-base checkpoint: its weights are the trained tensors only
            ckpt.validate_folder(tmp)


def _base_tensors(base: dict, config: ModelConfig, names: list[str]) -> dict[str, Raw]:
    """The frozen tensors `names` of a frozen-base checkpoint, from its base folder (checked by sha256)."""
    path = Path(str(base.get("path")))
    if not isinstance(base.get("sha256"), str) or tr.weights_sha256(path) != base["sha256"]:
        raise ckpt.CheckpointError(f"{path}: the base folder's weights are not those the checkpoint was trained "
                                   "from (sha256 differs); cannot reassemble the model")
    base_config, _, where = ckpt.validate_folder(path)
    if ckpt.param_shapes(base_config) != ckpt.param_shapes(config):
        raise ckpt.CheckpointError(f"{path}: the base folder's weights have other shapes than the checkpoint's model")
    out = {}
    for f in sorted({where[n] for n in names}):
        raw, _ = read_raw(f)
        out.update({n: raw[n] for n in names if n in raw})
    return out


def _trainer_files(src: Path, config: ModelConfig, to: str, trained: list[str] | None = None
                   ) -> tuple[dict[str, Raw], dict, dict]:
    """(optimizer tensors, optimizer.json, trainer_state.json for `to`) of a trainer checkpoint, checked
    against the model config; the RNG state is dropped when the backend changes (not portable)."""
    state = tr.read_trainer_state(src, None)
    for f in (tr.OPTIMIZER_FILE, tr.OPTIMIZER_JSON):
        if not (src / f).is_file():
            raise ckpt.CheckpointError(f"{src / f}: missing (incomplete training checkpoint)")
    opt_tensors, _ = read_raw(src / tr.OPTIMIZER_FILE)
    opt_doc = _read_json(src / tr.OPTIMIZER_JSON)
    tr.check_optimizer_state(config, {n: t.shape for n, t in opt_tensors.items()}, opt_doc, src / tr.OPTIMIZER_FILE,
                             trained)
    odd = [n for n, t in opt_tensors.items() if t.dtype not in FLOAT_TAGS]
    if odd:
        raise ckpt.CheckpointError(f"{src / tr.OPTIMIZER_FILE}: tensor {odd[0]!r} has dtype "
                                   f"{opt_tensors[odd[0]].dtype}, expected a float dtype")
    if ModelConfig.from_dict(state["model"]) != config:
        raise ckpt.CheckpointError(f"{src}: trainer_state.json and config.json hold different model configs")
    if state["backend"] != to:
        state = {**state, "backend": to, "rng": {}, "converted_from": state["backend"]}
    return opt_tensors, opt_doc, state


def _write_trainer_files(tmp: Path, opt_tensors: dict[str, Raw], opt_doc: dict, state: dict, meta: dict) -> None:
    write_raw(tmp / tr.OPTIMIZER_FILE, opt_tensors, meta)  # bytes unchanged: one layout in both backends
    ckpt.write_json(tmp / tr.OPTIMIZER_JSON, opt_doc)
    tr.write_trainer_state(tmp, state)


def _training_config(src: Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, extra config.json fields: tokenizer, task) of a training checkpoint or weights file."""
    folder = src if src.is_dir() else src.parent
    path, state_path = folder / ckpt.CONFIG_FILE, folder / tr.TRAINER_STATE_FILE
    state = _read_json(state_path) if state_path.is_file() else {}
    if path.is_file():
        doc = _read_json(path)
        if doc.get("format") == ckpt.FORMAT:
            ckpt.read_config(folder)  # checks format_version and the model config
        model = doc.get("model", doc)  # an lm-sleep document, {"model": {...}} or bare ModelConfig fields
    elif isinstance(state.get("model"), dict):
        doc, path, model = {}, state_path, state["model"]
    else:
        raise ckpt.CheckpointError(f"{folder}: no config.json (the model config must lie beside the weights)")
    try:
        config = ModelConfig.from_dict(model)
    except ValueError as e:
        raise ckpt.CheckpointError(f"{path}: bad model config: {e}") from None
    extra = {"tokenizer": doc.get("tokenizer")} if doc.get("tokenizer") else {}
    extra.update({k: doc[k] for k in ("retrofit", tr.BASE_KEY) if doc.get(k) is not None})
    task = doc.get("task") or state.get("task")
    if task:
        extra["task"] = task
    return config, extra


def _training_weight_files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    if (src / ckpt.INDEX_FILE).is_file() or (src / ckpt.WEIGHTS_FILE).is_file():
        return ckpt.weight_files(src)
    files = sorted(f for f in src.glob("*.safetensors") if f.name != tr.OPTIMIZER_FILE)
    if not files:
        raise ckpt.CheckpointError(f"{src}: no model weights (*.safetensors besides {tr.OPTIMIZER_FILE})")
    return files


def _read_json(path: Path) -> dict:
    doc = ckpt.read_json_file(path, "no such file")
    if not isinstance(doc, dict):
        raise ckpt.CheckpointError(f"{path}: expected a JSON object")
    return doc


def _report(kind, src, dst, to, tensors: dict[str, Raw], quant) -> dict:
    dtypes = sorted({t.dtype for t in tensors.values() if t.dtype in FLOAT_TAGS})
    names = {v: k for k, v in DTYPE_TAGS.items()}
    return {"kind": kind, "src": str(src), "dst": str(dst), "to": to, "tensors": len(tensors),
            "bytes": sum(t.nbytes for t in tensors.values()), "dtypes": [names[d] for d in dtypes],
            **({"quantization": quant} if quant else {})}


__all__ = ["convert_model", "convert_training_checkpoint", "convert_path", "detect", "strip_prefixes", "summary"]
