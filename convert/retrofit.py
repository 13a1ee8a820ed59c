"""`lmsleep retrofit`: a pretrained Llama-family checkpoint becomes a sleeping hybrid model folder.

    report = retrofit("smollm2-135m-instruct", "runs/smol", window=512, passes=2)

The source (a Hugging Face folder, a Hub repo id, a .gguf file or a bundled model name) is read by
convert.sources into Hugging Face-named float32 arrays; common.retrofit plans the block list and
the config; the attention layers keep their weights under canonical names, the inserted SSM blocks
start as exact no-ops (`ssm.o_proj` = 0); the folder gets config.json (with the `retrofit` record
and an "hf" tokenizer block), the weights in one dtype, tokenizer.json and the chat template.
Nothing is written to OUT unless every step succeeds (one atomic rename at the end).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from common import checkpoint as ckpt
from common import retrofit as plan_mod
from common.pretrained import hf_to_canonical
from convert.dtypes import DTYPE_TAGS, from_numpy, write_raw

TEXT_FILES = ("tokenizer.json", "chat_template.jinja")  # carried into OUT beside config.json


def retrofit(src: str | os.PathLike, out: str | os.PathLike, *, insert: int | None = None,
             insert_at: list[int] | None = None, loop: str | None = None, window: int = 1024,
             eviction: str = "hard", passes: int = 2, ssm_heads: int | None = None, ssm_head_dim: int | None = None,
             init: str = "zero", dtype: str = "float32", backend: str | None = None, overwrite: bool = False,
             revision: str | None = None, download=None, seed: int = 0, progress=None) -> dict:
    """Build the sleeping hybrid of `src` in folder `out` -> a report dict (see `summary`)."""
    from common.hf_tokenizer import HFTokenizer
    from convert.sources import load_source

    ckpt.check_dtype(dtype)
    out = Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists (pass --force to replace it)")
    t0 = time.perf_counter()
    say = progress or (lambda message: None)
    say(f"reading {src}")
    source = load_source(src, revision=revision, download=download)
    p = plan_mod.plan(source.arch, insert=insert, insert_at=insert_at, loop=loop, window=window, eviction=eviction,
                      passes=passes, ssm_heads=ssm_heads, ssm_head_dim=ssm_head_dim)
    layer_map = p.layer_map()
    arrays = {}
    for name, value in source.tensors.items():
        canonical = hf_to_canonical(name, layer_map)
        if canonical is not None and not (canonical == "lm_head.weight" and p.config.tie_embeddings):
            arrays[canonical] = value
    arrays.update(plan_mod.inserted_params(p, arrays, init=init, seed=seed))
    expected = ckpt.param_shapes(p.config)
    if set(arrays) != set(expected):
        missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
        raise ValueError(f"retrofit of {src}: weights do not match the plan (missing {missing[:2]}, extra {extra[:2]})")
    for name, shape in expected.items():
        if tuple(arrays[name].shape) != shape:
            raise ValueError(f"retrofit of {src}: {name} has shape {arrays[name].shape}, the plan needs {shape}")
        if not np.isfinite(arrays[name]).all():
            raise ValueError(f"retrofit of {src}: source tensor for {name} holds NaN or Inf")
    files, tokenizer = {}, None
    if "tokenizer.json" in source.files:  # a source without one still runs on token ids
        tokenizer = HFTokenizer.from_files(source.files, chat_template=source.chat_template)
        files["tokenizer.json"] = tokenizer.to_json()
        if source.chat_template:
            files["chat_template.jinja"] = source.chat_template
    origin = {k: v for k, v in source.origin.items() if v is not None}
    record = p.record(origin, init, sorted(files))
    doc = ckpt.config_document(p.config, tokenizer.to_dict() if tokenizer else None, retrofit=record)
    say(f"writing {out}")
    tag = DTYPE_TAGS[dtype]
    raw = {name: from_numpy(arrays[name], tag) for name in expected}
    with ckpt.atomic_folder(out, overwrite=overwrite) as tmp:
        write_raw(tmp / ckpt.WEIGHTS_FILE, raw, {"format": ckpt.FORMAT, "backend": backend or "retrofit"})
        ckpt.write_json(tmp / ckpt.CONFIG_FILE, doc)
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
    base, new = plan_mod.parameter_counts(p)
    return {"src": str(src), "out": str(out), "pattern": p.config.pattern, "inserted": p.inserted,
            "loop_blocks": list(p.config.loop_range), "loop_source_layers": list(p.loop),
            "source_params": base, "inserted_params": new, "dtype": dtype, "seconds": time.perf_counter() - t0,
            "bytes": sum(t.nbytes for t in raw.values()), "tokenizer": bool(tokenizer),
            "chat_template": "chat_template.jinja" in files}


def summary(report: dict) -> str:
    n = len(report["pattern"])
    return (f"retrofitted {report['src']} -> {report['out']}: {n} blocks ({len(report['inserted'])} SSM inserted at "
            f"{report['inserted']}), loop blocks [{report['loop_blocks'][0]}, {report['loop_blocks'][1]}) = "
            f"source layers [{report['loop_source_layers'][0]}, {report['loop_source_layers'][1]}), "
            f"{report['source_params'] / 1e6:.1f}M source + {report['inserted_params'] / 1e6:.1f}M new parameters, "
            f"{report['dtype']}, {report['bytes'] / 2**20:.0f} MiB, {report['seconds']:.1f} s"
            + ("" if report["tokenizer"] else " (the source has no tokenizer.json: token ids only)"))
