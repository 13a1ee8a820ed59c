"""Framework-free training: the loop, its bookkeeping and everything both backends must agree on
(SPEC sections 3, 5, 6).

sleep_torch/train.py and sleep_mlx/train.py hold only framework code: the model, the optimizers,
one optimizer step (`train_step`), evaluation and the tensors of a checkpoint. This file holds the
rest, once, so that a run means the same thing on either backend:

- the loop (`run_loop`: data of each step, log / eval / checkpoint cadence, NaN stop, summary),
  its checks (`prepare_run`) and the resume block (`resume_state`),
- which parameters Muon trains and which AdamW trains (`is_muon_param`, `optimizer_params`),
- the learning-rate schedule (`lr_at`: a multiplier of each optimizer's peak lr),
- the data of each step (`data_seed`, `EVAL_SEED`, `batch_for_step`, `rank_rows`, `micro_rows`),
- the model config a task implies (`resolve_model_config`, `check_task_config`),
- the files of a run: metrics.jsonl (`MetricsLog`), checkpoint/trainer_state.json
  (`trainer_state`, `read_trainer_state`, `check_resume`) and the optimizer state layout
  (`OPTIMIZER_STATE`, `optimizer_document`, `check_optimizer_state`), which is the same in both
  backends, so a checkpoint converts by copying (convert/) and resumes on the other backend.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import re
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from common.checkpoint import (CONFIG_FILE, FORMAT, WEIGHTS_FILE, CheckpointError, atomic_file, atomic_folder,
                               config_document, param_shapes, read_config, read_json_file, recover_folder,
                               weight_files, write_companions, write_json)
from common.config import PRESETS, TRAIN_PRESETS, ModelConfig, TrainConfig, parse_override, split_overrides
from common.tasks.base import Batch

# --- files of a run (out_dir/...) -----------------------------------------------------------------
CHECKPOINT_DIR = "checkpoint"  # model folder + optimizer.safetensors + optimizer.json + trainer_state.json
MODEL_DIR = "model"  # plain model folder of the latest weights (with the task's tokenizer)
METRICS_FILE = "metrics.jsonl"  # one JSON object per logged step
TRAINER_STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"  # every optimizer state tensor, by name (see below)
OPTIMIZER_JSON = "optimizer.json"  # the rest of the optimizer state: hyper-parameters and scalars
TRAINER_FORMAT = "lm-sleep-trainer"
TRAINER_FORMAT_VERSION = 2  # 2: one optimizer layout for both backends (version 1 had each backend's own keys)


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or gradient); the message is one line."""

# --- which optimizer trains which parameter ---------------------------------------------------------
# Muon: the 2-D matrices inside the blocks (mixer projections and the MLP). AdamW: everything else
# (embedding, lm_head, norms, the gate projections a_proj/b_proj, conv kernels, A_log, dt_bias).
_MUON = re.compile(r"layers\.\d+\.(attn\.[qkvo]_proj|ssm\.[qkvgo]_proj|mlp\.(gate|up|down)_proj)\.weight")


def is_muon_param(name: str) -> bool:
    """True for the canonical names that Muon optimizes (block matrices), False for AdamW's."""
    return _MUON.fullmatch(name) is not None


def optimizer_params(config: ModelConfig, trainable=None) -> dict[str, list[str]]:
    """{"muon": names, "adamw": names}: the parameters each optimizer trains, in canonical order
    (`trainable`: the names that train when some are frozen, see `trainable_names`; None = all)."""
    names = [n for n in param_shapes(config) if trainable is None or n in set(trainable)]
    return {"muon": [n for n in names if is_muon_param(n)], "adamw": [n for n in names if not is_muon_param(n)]}


# --- optimizer state: one layout for both backends ------------------------------------------------
# optimizer.safetensors holds, per trained parameter, the tensors below (float32, the parameter's
# shape) named "{optimizer}.{parameter}.{key}"; optimizer.json holds per optimizer the number of
# steps it has taken and the parameters it trains. Each backend maps its optimizer internals to and
# from these names (torch AdamW exp_avg / exp_avg_sq / step, Muon momentum_buffer; MLX AdamW m / v /
# step, Muon v), so a checkpoint converts between backends by copying. Hyper-parameters are the
# TrainConfig's (trainer_state.json "train"); the lr is peak * lr_at(step).
OPTIMIZER_STATE = {"muon": ("momentum",), "adamw": ("exp_avg", "exp_avg_sq")}


def optimizer_tensor_name(optimizer: str, param: str, key: str) -> str:
    """Name of one optimizer state tensor in optimizer.safetensors, e.g. 'adamw.embed.weight.exp_avg'."""
    return f"{optimizer}.{param}.{key}"


def split_optimizer_tensor_name(name: str) -> tuple[str, str, str]:
    optimizer, rest = name.split(".", 1)
    param, key = rest.rsplit(".", 1)
    return optimizer, param, key


def optimizer_document(config: ModelConfig, steps: dict[str, int], trainable=None) -> dict:
    """optimizer.json: {"muon" | "adamw": {"step": steps taken, "params": [canonical names]}}
    (frozen parameters have no optimizer state and are not listed)."""
    params = optimizer_params(config, trainable)
    return {name: {"step": int(steps[name]), "params": params[name]} for name in OPTIMIZER_STATE}


def check_optimizer_state(config: ModelConfig, shapes: dict[str, tuple[int, ...]], doc, where,
                          trainable=None) -> None:
    """Refuse optimizer state that does not fit `config` (CheckpointError naming the tensor).

    shapes: optimizer tensor name -> shape (from optimizer.safetensors); doc: optimizer.json;
    trainable: the parameters that train (None = all). Every trained parameter has all its tensors
    once its optimizer has stepped, none before; a frozen one has none.
    """
    params, expected = optimizer_params(config, trainable), param_shapes(config)
    if not isinstance(doc, dict):
        raise CheckpointError(f"{where}: optimizer.json is not a JSON object")
    for opt, keys in OPTIMIZER_STATE.items():
        entry = doc.get(opt)
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), int) or entry["step"] < 0:
            raise CheckpointError(f"{where}: optimizer.json needs {{\"{opt}\": {{\"step\": n, \"params\": [...]}}}}")
        if entry.get("params") != params[opt]:
            raise CheckpointError(f"{where}: optimizer.json says {opt} trains other parameters than this model's")
        needed = {optimizer_tensor_name(opt, p, k) for p in params[opt] for k in keys} if entry["step"] else set()
        missing = sorted(needed - set(shapes))
        if missing:
            raise CheckpointError(f"{where}: missing optimizer tensor {missing[0]}"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for name, shape in shapes.items():
        opt, param, key = split_optimizer_tensor_name(name) if name.count(".") >= 2 else (name, "", "")
        if opt not in OPTIMIZER_STATE or key not in OPTIMIZER_STATE[opt] or param not in params[opt]:
            raise CheckpointError(f"{where}: unexpected optimizer tensor {name}")
        if not doc[opt]["step"]:
            raise CheckpointError(f"{where}: optimizer tensor {name} of a {opt} that has taken no step")
        if tuple(shape) != expected[param]:
            raise CheckpointError(f"{where}: optimizer tensor {name} has shape {list(shape)}, "
                                  f"the parameter's is {list(expected[param])}")


# --- fine-tuning a model folder (train(init=DIR), `lmsleep train --init DIR`) ---------------------------
# The model's config, weights, tokenizer and chat template come from a model folder. TrainConfig.freeze
# picks what stays fixed: "base" = everything but the blocks a retrofit inserted (config.json's
# `retrofit` record, "inserted"), "mlp" = the MLP projections, "none" = nothing. Frozen parameters get
# no optimizer state and are not rewritten in checkpoints: the checkpoint's model.safetensors then
# holds the trained tensors only, and its config.json a "base" block naming the init folder and the
# sha256 of its weight files, from which resume and convert reassemble the model (docs/FORMAT.md).
BASE_KEY = "base"  # config.json of a checkpoint whose frozen weights live in the init folder
_MLP_WEIGHT = re.compile(r"layers\.\d+\.mlp\.(gate|up|down)_proj\.weight")


def trainable_names(config: ModelConfig, freeze: str, inserted=()) -> list[str] | None:
    """Canonical names of the parameters that train under TrainConfig.freeze (None: all of them).
    "base": every parameter of the blocks in `inserted` (a retrofit's SSM blocks: mixer and norm1);
    "mlp": all but the MLP projections (norm2 keeps training: a few numbers per block)."""
    names = list(param_shapes(config))
    if freeze == "none":
        return None
    if freeze == "mlp":
        return [n for n in names if not _MLP_WEIGHT.fullmatch(n)]
    prefixes = tuple(f"layers.{i}." for i in inserted)
    return [n for n in names if n.startswith(prefixes)]


def weights_sha256(folder) -> str:
    """sha256 of a model folder's weight files, in file-name order (the identity of a frozen base)."""
    h = hashlib.sha256()
    for f in weight_files(folder):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


@dataclass
class FineTune:
    """What train(init=DIR) starts from: the folder, its config.json, what trains and the base reference."""

    folder: Path
    config: ModelConfig  # the folder's model config
    doc: dict  # the folder's whole config.json (tokenizer block, retrofit record)
    trainable: list[str] | None  # canonical names that train; None = all
    base: dict | None  # {"path", "sha256", "freeze"}: the checkpoints' reference to the frozen weights

    @property
    def retrofit(self) -> dict | None:
        return self.doc.get("retrofit")


def fine_tune(init, tc: TrainConfig) -> FineTune | None:
    """The fine-tuning plan of train(init=...) (None without init); ValueError for a freeze that cannot
    apply: any freeze without a folder, "base" on a folder that is not a retrofit."""
    if init is None:
        if tc.freeze != "none":
            raise ValueError(f"TrainConfig.freeze={tc.freeze!r} freezes the weights of a model folder: "
                             "give one to fine-tune (init=DIR, --init DIR)")
        return None
    config, doc = read_config(init)
    record = doc.get("retrofit")
    inserted = record.get("inserted") if isinstance(record, dict) else None
    if tc.freeze == "base":
        if not inserted:
            raise ValueError(f"--freeze base trains only the SSM blocks a retrofit inserted, and {init} is not a "
                             "retrofit (no retrofit record in its config.json); use --freeze none or mlp")
        bad = [i for i in inserted if not (isinstance(i, int) and 0 <= i < config.n_layers
                                           and config.layer_types[i] == "S")]
        if bad:
            raise ValueError(f"{Path(init) / CONFIG_FILE}: retrofit.inserted names {bad[0]!r}, not an SSM block")
    trainable = trainable_names(config, tc.freeze, inserted or ())
    base = None
    if trainable is not None:
        base = {"path": str(Path(init).resolve()), "sha256": weights_sha256(init), "freeze": tc.freeze}
    return FineTune(Path(init), config, doc, trainable, base)


def check_init_config(ft: FineTune, mc: ModelConfig) -> None:
    """The ModelConfig trained from `ft` may change runtime fields (window, sleep_passes, eviction...),
    never a weight's shape (ValueError naming the fields)."""
    if param_shapes(mc) != param_shapes(ft.config):
        diff = [k for k, v in ft.config.to_dict().items() if mc.to_dict()[k] != v]
        raise ValueError(f"the model config changes the weights of {ft.folder} (fields {diff}); "
                         "only fields such as window, eviction and sleep_passes may differ from the folder's")


def frozen_base_weights(folder, config: ModelConfig, trainable, load):
    """The trained tensors of a frozen-base checkpoint (`load(path)` -> {name: tensor}), checked to be
    exactly them; None for a checkpoint that holds every weight."""
    if BASE_KEY not in read_json_file(Path(folder) / CONFIG_FILE, "config.json"):
        return None
    saved = load(Path(folder) / WEIGHTS_FILE)
    check_checkpoint_weights(folder, config, {n: tuple(t.shape) for n, t in saved.items()}, trainable)
    return saved


def check_checkpoint_weights(folder, config: ModelConfig, shapes: dict, trainable) -> None:
    """Refuse a checkpoint's weights that are not exactly the trained tensors (all of them when nothing
    is frozen) with their shapes (CheckpointError naming the tensor)."""
    expected = param_shapes(config)
    want = list(expected) if trainable is None else list(trainable)
    missing, extra = [n for n in want if n not in shapes], sorted(set(shapes) - set(want))
    where = Path(folder) / WEIGHTS_FILE
    if missing or extra:
        raise CheckpointError(f"{where}: " + (f"missing tensor {missing[0]}" if missing else f"unexpected tensor {extra[0]}")
                              + f" ({len(missing)} missing, {len(extra)} unexpected for "
                              + ("the trained parameters)" if trainable is not None else "this model)"))
    for n in want:
        if tuple(shapes[n]) != expected[n]:
            raise CheckpointError(f"{where}: {n} has shape {list(shapes[n])}, the model's is {list(expected[n])}")


def check_base(ckpt_dir, state: dict, ft: FineTune | None, tc: TrainConfig) -> None:
    """Refuse to resume a checkpoint whose frozen weights are not this run's: another freeze, no init
    folder, or an init folder whose weights differ from the base the checkpoint was trained from."""
    doc = read_json_file(Path(ckpt_dir) / CONFIG_FILE, "config.json of the training checkpoint")
    saved = doc.get(BASE_KEY) if isinstance(doc, dict) else None
    was = state["train"].get("freeze", "none")
    if was != tc.freeze:
        raise ValueError(f"cannot resume with freeze={tc.freeze!r}: {ckpt_dir} was trained with freeze={was!r} "
                         "(its optimizer state covers other parameters)")
    if saved is None:
        return
    if not isinstance(saved, dict) or not isinstance(saved.get("sha256"), str):
        raise CheckpointError(f"{Path(ckpt_dir) / CONFIG_FILE}: base must be {{\"path\": ..., \"sha256\": ...}}")
    if ft is None or ft.base is None:
        raise ValueError(f"cannot resume: {ckpt_dir} holds only the trained tensors; its frozen weights are "
                         f"those of {saved.get('path')} (pass init=that folder, --init)")
    if saved["sha256"] != ft.base["sha256"]:
        raise ValueError(f"cannot resume: {ckpt_dir} was trained from another base ({saved.get('path')}, weights "
                         f"sha256 {saved['sha256'][:12]}...) than {ft.folder} (sha256 {ft.base['sha256'][:12]}...)")


def checkpoint_extra(ft: FineTune | None) -> dict:
    """config.json fields a run's checkpoint/ and model/ keep from the init folder: the retrofit record
    (so that model/ can be fine-tuned again with --freeze base); checkpoint/ adds "base" itself."""
    return {"retrofit": ft.retrofit} if ft is not None and ft.retrofit is not None else {}


def task_defaults(task_name: str, task_params: dict, init_config: ModelConfig, init) -> dict:
    """A natural-text task (one with a tokenizer_dir parameter) fine-tuning a folder reads the folder's
    tokenizer and the model's window unless the user gave them."""
    from common.tasks import TASKS

    accepted = inspect.signature(TASKS[task_name]).parameters if task_name in TASKS else {}
    params = dict(task_params)
    if "tokenizer_dir" in accepted:
        if "tokenizer_dir" not in params and params.get("tokenizer") is None:
            params["tokenizer_dir"] = str(init)
        params.setdefault("window", init_config.window)
    return params


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


# --- learning-rate schedule -------------------------------------------------------------------------

def lr_at(step: int, tc: TrainConfig) -> float:
    """Multiplier of the peak learning rates for optimizer step `step` (0-based).

    Linear warmup from 1/warmup_steps to 1 over the first warmup_steps steps, then `tc.schedule`
    from 1 down to min_lr_ratio at step tc.steps (cosine, linear) or flat at 1 (constant).
    Steps past tc.steps stay at the final value.
    """
    if step < tc.warmup_steps:
        return (step + 1) / tc.warmup_steps
    if tc.schedule == "constant":
        return 1.0
    progress = min((step - tc.warmup_steps) / max(tc.steps - tc.warmup_steps, 1), 1.0)
    if tc.schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # linear
        decay = 1.0 - progress
    return tc.min_lr_ratio + (1.0 - tc.min_lr_ratio) * decay


def scheduled_lrs(tc: TrainConfig, step: int) -> tuple[float, dict[str, float]]:
    """(lr_at(step, tc), {"muon": lr, "adamw": lr}): what set_lr gives each optimizer at `step`."""
    factor = lr_at(step, tc)
    return factor, {"muon": tc.muon_lr * factor, "adamw": tc.adamw_lr * factor}


# --- data -------------------------------------------------------------------------------------------
# Training step s samples its global batch with data_seed(tc.seed, s): even numbers only, so the
# evaluation seed (odd) is never a training seed. The "data position" of a run is just its step.
EVAL_SEED = 1  # fixed for every run, so evals of different runs/seeds are comparable


def data_seed(seed: int, step: int) -> int:
    """Task seed of training step `step` (0-based) in a run with TrainConfig.seed = seed."""
    return 2 * (seed * 2**40 + step)


def rank_rows(batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of the global batch's rows that rank `rank` of `world` trains on (contiguous)."""
    if batch_size % world:
        raise ValueError(f"TrainConfig.batch_size={batch_size} must be divisible by the world size {world}")
    per = batch_size // world
    return rank * per, (rank + 1) * per


def micro_rows(rows: int, grad_accum: int) -> list[tuple[int, int]]:
    """Split `rows` local rows into grad_accum consecutive micro-batches [start, stop)."""
    if rows % grad_accum:
        raise ValueError(f"TrainConfig.grad_accum={grad_accum} must divide the per-rank batch of {rows} rows")
    per = rows // grad_accum
    return [(i * per, (i + 1) * per) for i in range(grad_accum)]


def counted_targets(batch: Batch) -> int:
    """Targets that count in the loss: loss_mask[:, 1:] (logits[:, t] predicts tokens[:, t+1])."""
    return int(batch.loss_mask[:, 1:].sum())


def batch_for_step(task, tc: TrainConfig, step: int, rank: int = 0, world: int = 1) -> tuple[Batch, int]:
    """(this rank's rows of step `step`'s global batch, counted targets in the whole global batch)."""
    batch = task.sample(tc.batch_size, seed=data_seed(tc.seed, step))
    count = counted_targets(batch)
    if count == 0:
        raise ValueError(f"the batch of step {step + 1} has no counted targets (loss_mask is all False)")
    start, stop = rank_rows(tc.batch_size, rank, world)
    local = Batch(batch.tokens[start:stop], batch.loss_mask[start:stop],
                  {k: v[start:stop] for k, v in batch.meta.items()})
    return local, count


def evaluate_batches(task, n: int, seed: int, batch_size: int, score: Callable) -> dict:
    """The body of sleep_*.train.evaluate: {"loss": mean counted cross-entropy, **task.score} on
    task.sample(n, seed), `batch_size` rows at a time. score(tokens, loss_mask) runs the model on numpy
    rows -> (float32 numpy logits, summed counted cross-entropy, counted targets)."""
    batch = task.sample(n, seed)
    logits, loss_sum, count = [], 0.0, 0
    for i in range(0, n, batch_size):
        out, s, c = score(batch.tokens[i:i + batch_size], batch.loss_mask[i:i + batch_size])
        logits.append(out)
        loss_sum, count = loss_sum + s, count + c
    return {**task.score(np.concatenate(logits), batch), "loss": loss_sum / max(count, 1)}


# --- model config from the task ---------------------------------------------------------------------
TASK_FIELDS = ("vocab_size", "window")  # ModelConfig fields that the task decides


def resolve_model_config(task, base_config: ModelConfig | str, overrides: dict | None = None) -> ModelConfig:
    """The model config to train `task` with: the base (a ModelConfig or a preset name) with the
    task's vocab_size and window, then `overrides`. An override of vocab_size or window that
    contradicts the task raises ValueError naming the field."""
    base = PRESETS[base_config] if isinstance(base_config, str) and base_config in PRESETS else base_config
    if isinstance(base, str):
        raise ValueError(f"unknown preset {base!r}; known: {', '.join(sorted(PRESETS))}")
    overrides = dict(overrides or {})
    for name in TASK_FIELDS:
        if name in overrides and overrides[name] != getattr(task, name):
            raise ValueError(f"ModelConfig.{name}={overrides[name]!r} contradicts task {task.name!r} "
                             f"({name}={getattr(task, name)}); leave it unset to use the task's")
    return base.replace(**{**{name: getattr(task, name) for name in TASK_FIELDS}, **overrides})


def build_run(task_name: str, task_params: dict, preset: str | None, overrides: dict, *, passes=None,
              grad_accum=None, steps=None, data=None, init=None, freeze=None):
    """(task, ModelConfig, TrainConfig) from a preset, flat key=value overrides and the task itself.

    init: a model folder to fine-tune; its config is the model's (overrides may change runtime fields
    such as window or sleep_passes), a natural-text task defaults to its tokenizer and window, and the
    preset (default "retrofit") is a train preset only; freeze: TrainConfig.freeze (default: the
    preset's, "none" for a folder that is not a retrofit)."""
    from common.tasks import make  # here, not at the top: tasks do not need the trainer's helpers

    if data is not None:
        task_params = {**task_params, "path": str(data)}
    model_over, train_over = split_overrides(overrides)
    if passes is not None:
        model_over["sleep_passes"] = passes
    for key, value in (("grad_accum", grad_accum), ("steps", steps), ("freeze", freeze)):
        if value is not None:
            train_over[key] = value
    if init is None:
        preset = preset or "debug"
        if preset not in PRESETS and preset in TRAIN_PRESETS:
            raise ValueError(f"preset {preset!r} fine-tunes a model folder: pass --init DIR (init=DIR)")
        task = make(task_name, **task_params)
        mc = resolve_model_config(task, preset, model_over)
        return task, mc, TRAIN_PRESETS.get(preset, TrainConfig()).replace(**train_over)
    init_config, doc = read_config(init)
    preset = preset or "retrofit"
    if preset not in TRAIN_PRESETS:
        raise ValueError(f"unknown train preset {preset!r}; known: {', '.join(sorted(TRAIN_PRESETS))}")
    if "freeze" not in train_over and not doc.get("retrofit"):
        train_over["freeze"] = "none"  # nothing was inserted: the default trains everything
    if "window" in model_over:
        task_params = {**task_params, "window": task_params.get("window", model_over["window"])}
    task = make(task_name, **task_defaults(task_name, task_params, init_config, init))
    mc = init_config.replace(**{"window": task.window, **model_over})
    check_task_config(task, mc)
    return task, mc, TRAIN_PRESETS[preset].replace(**train_over)


def train_arg_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The flags of `python -m sleep_{torch,mlx}.train` (what torchrun launches)."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    p.add_argument("--task", required=True, help="task name: rule110, depo, gsm, text")
    p.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="task parameter, e.g. --task-arg steps=0 (repeatable)")
    p.add_argument("--preset", help=f"model + train preset: {', '.join(PRESETS)} (default debug; with --init: "
                   f"a train preset, default retrofit)")
    p.add_argument("--init", help="model folder to fine-tune (its config, weights and tokenizer)")
    p.add_argument("--freeze", choices=("none", "mlp", "base"), help="TrainConfig.freeze (with --init)")
    p.add_argument("--out", required=True, help="output folder (metrics.jsonl, checkpoint/, model/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="ModelConfig or TrainConfig field, e.g. --set batch_size=32 (repeatable)")
    p.add_argument("--steps", type=int, help="TrainConfig.steps (the schedule's length)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps without changing the schedule")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run_from_args(args: argparse.Namespace):
    """(task, ModelConfig, TrainConfig) from train_arg_parser's parsed flags."""
    return build_run(args.task, dict(parse_override(s) for s in args.task_arg), args.preset,
                     dict(parse_override(s) for s in args.set), steps=args.steps, init=args.init, freeze=args.freeze)


def main(train: Callable, prog: str, doc: str, argv=None, *, devices: tuple[str, ...] | None = None) -> int:
    """`python -m sleep_{torch,mlx}.train`: parse the flags, train, print the summary as JSON (rank 0).
    devices: the choices of a --device flag (MLX), None for none."""
    p = train_arg_parser(prog, doc)
    if devices:
        p.add_argument("--device", choices=devices, help="device (default: the backend's default device)")
    args = p.parse_args(argv)
    try:
        task, mc, tc = run_from_args(args)
        summary = train(task, mc, tc, args.out, resume=args.resume, progress=not args.no_progress,
                        max_steps=args.max_steps, init=args.init, **({"device": args.device} if devices else {}))
    except (ValueError, OSError, TrainingError) as e:  # one line (from rank 0), exit 2, as the click CLI
        if int(os.environ.get("RANK", "0")) == 0:
            message = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
            print(f"error: {message.strip().splitlines()[0] if message.strip() else type(e).__name__}",
                  file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


def check_task_config(task, config: ModelConfig) -> None:
    """Refuse a model config whose vocab_size or window differs from the task's (ValueError)."""
    for name in TASK_FIELDS:
        if getattr(config, name) != getattr(task, name):
            raise ValueError(f"ModelConfig.{name}={getattr(config, name)} contradicts task {task.name!r} "
                             f"({name}={getattr(task, name)}); build the config with "
                             f"common.training.resolve_model_config(task, preset, overrides)")


# --- metrics.jsonl ----------------------------------------------------------------------------------

class MetricsLog:
    """Appends one JSON object per line to out_dir/metrics.jsonl.

    On resume from step s, lines logged after s by the interrupted run are dropped first, so the
    file reads as one uninterrupted run; a last line torn by a kill is dropped with a note.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [r for r in parse_metrics(self.path, note=True) if r.get("step", 0) <= resume_step]
        with atomic_file(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def parse_metrics(path: str | os.PathLike, *, note: bool = False) -> list[dict]:
    """The records of a metrics.jsonl. A last line that is not JSON was torn by a kill mid-write: it
    is dropped (with a note on stderr when `note`); a bad line before it is a ValueError naming the file
    and line."""
    lines = Path(path).read_text(errors="replace").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step", 0), int):
            if i == len(lines) - 1:
                if note:
                    print(f"note: {path}:{i + 1}: dropped a torn last line (a write cut short by a crash)",
                          file=sys.stderr)
                break
            raise ValueError(f"{path}:{i + 1}: not a metrics record (a JSON object with an integer step); "
                             "fix or delete that line")
        records.append(record)
    return records


def read_metrics(path: str | os.PathLike) -> list[dict]:
    return parse_metrics(path)


# --- trainer_state.json -----------------------------------------------------------------------------

def trainer_state(*, backend: str, step: int, model_config: ModelConfig, train_config: TrainConfig,
                  task, rng: dict, elapsed: float, metrics: dict | None = None) -> dict:
    """The JSON document that, with the weights and optimizer files, lets a run continue exactly."""
    return {
        "format": TRAINER_FORMAT,
        "format_version": TRAINER_FORMAT_VERSION,
        "backend": backend,
        "step": step,  # optimizer steps done; also the data position (step s uses data_seed(seed, s))
        "rng": rng,  # backend generator states as lists of ints
        "elapsed": elapsed,  # training seconds so far
        "model": model_config.to_dict(),
        "train": train_config.to_dict(),
        "task": {"name": task.name, "params": task.params},
        "metrics": metrics or {},
    }


def write_trainer_state(folder: str | os.PathLike, doc: dict) -> None:
    """Write trainer_state.json atomically; the long RNG lists stay on one line each."""
    text = json.dumps({**doc, "rng": "@RNG@"}, indent=2)
    rng = ",\n".join(f'    "{k}": {json.dumps(v)}' for k, v in doc["rng"].items())
    with atomic_file(Path(folder) / TRAINER_STATE_FILE) as tmp:
        tmp.write_text(text.replace('"@RNG@"', "{\n" + rng + "\n  }") + "\n")


def read_trainer_state(folder: str | os.PathLike, backend: str | None) -> dict:
    """Read checkpoint/trainer_state.json; a checkpoint of the other backend raises ValueError
    (backend None: any backend's)."""
    path = Path(folder) / TRAINER_STATE_FILE
    recover_folder(folder)  # a checkpoint replacement killed half-way: put the complete copy back
    doc = read_json_file(path, "no training checkpoint to resume from")
    if not isinstance(doc, dict) or doc.get("format") != TRAINER_FORMAT:
        raise CheckpointError(f"{path}: not an lm-sleep trainer state")
    if doc.get("format_version") != TRAINER_FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {doc.get('format_version')!r} is not supported (this "
                              f"lm-sleep reads version {TRAINER_FORMAT_VERSION}: one optimizer layout for both backends)")
    if backend is not None and doc.get("backend") != backend:
        raise ValueError(f"{folder} is a {doc.get('backend')!r} training checkpoint and this is the {backend!r} "
                         f"trainer; convert it first (lmsleep convert {folder} NEW_OUT/checkpoint --to {backend}, "
                         f"then resume NEW_OUT) or resume with the {doc.get('backend')} backend")
    return doc


def write_checkpoint(folder, backend: str, config: ModelConfig, tokenizer: dict | None, state: dict, weights: dict,
                     opt_tensors: dict, opt_doc: dict, save_tensors: Callable, *, files: dict | None = None,
                     extra: dict | None = None) -> None:
    """Write a training checkpoint folder atomically: config.json + model.safetensors (a model folder,
    or only the trained tensors when extra holds a "base" reference), optimizer.safetensors,
    optimizer.json, trainer_state.json and `files` (companions: tokenizer.json, chat template). Never pickle.
    save_tensors(path, {name: array}, metadata) is the backend's safetensors writer; extra: more
    config.json fields (retrofit record, base)."""
    meta = {"format": FORMAT, "backend": backend}
    with atomic_folder(folder, overwrite=True) as tmp:
        save_tensors(tmp / WEIGHTS_FILE, weights, meta)
        write_json(tmp / CONFIG_FILE, config_document(config, tokenizer, **(extra or {})))
        save_tensors(tmp / OPTIMIZER_FILE, opt_tensors, meta)
        write_json(tmp / OPTIMIZER_JSON, opt_doc)
        write_trainer_state(tmp, state)
        write_companions(tmp, files or {})


def read_checkpoint(folder, backend: str) -> tuple[dict, dict]:
    """(trainer_state.json, optimizer.json) of a training checkpoint of `backend`, its files checked;
    the backend reads the weights and optimizer.safetensors itself."""
    folder = Path(folder)
    state = read_trainer_state(folder, backend)
    for f in (WEIGHTS_FILE, OPTIMIZER_FILE, OPTIMIZER_JSON):
        if not (folder / f).is_file():
            raise CheckpointError(f"{folder / f}: missing (incomplete training checkpoint)")
    return state, read_json_file(folder / OPTIMIZER_JSON, "optimizer state")


def check_resume(doc: dict, model_config: ModelConfig, task) -> None:
    """Refuse to resume a checkpoint of another model or task (ValueError)."""
    saved = ModelConfig.from_dict(doc["model"])
    if saved != model_config:
        diff = [f"{k}: checkpoint {v!r} vs now {model_config.to_dict()[k]!r}"
                for k, v in saved.to_dict().items() if model_config.to_dict()[k] != v]
        raise ValueError(f"cannot resume: the model config differs from the checkpoint's ({'; '.join(diff)})")
    if doc["task"]["name"] != task.name or doc["task"]["params"] != task.params:
        raise ValueError(f"cannot resume: the checkpoint was trained on {doc['task']['name']} "
                         f"{doc['task']['params']}, not {task.name} {task.params}")
    return []


def changed_train_fields(doc: dict, tc: TrainConfig) -> list[str]:
    """TrainConfig fields that differ from the checkpoint's (allowed on resume, e.g. more steps,
    but then the run is no longer the uninterrupted one)."""
    saved, defaults = doc["train"], TrainConfig().to_dict()  # a field added since: its default then
    return [k for k, v in tc.to_dict().items() if saved.get(k, defaults[k]) != v]


# --- a run -------------------------------------------------------------------------------------------

@dataclass
class StepResult:
    """What one optimizer step (`sleep_*.train.train_step`) reports."""

    loss: float  # mean counted cross-entropy over the global batch (before the update)
    grad_norm: float  # global gradient norm before clipping
    lr_factor: float  # lr_at(step): both optimizers ran at peak * lr_factor
    fwd_bwd_s: float  # seconds until the loss was known: forward + backward of every micro-batch
    optimizer_s: float  # seconds of clipping and both optimizer steps (asynchronous devices: until queued)


def check_finite(what: str, value: float, step: int) -> None:
    """TrainingError before the optimizer step when the loss or gradient norm is NaN or inf."""
    if not math.isfinite(value):
        raise TrainingError(f"{what} is {value} at step {step + 1}")


def prepare_run(task, model_config: ModelConfig | str | None, tc: TrainConfig, out_dir, *, resume: bool,
                model=None, init=None) -> tuple[ModelConfig, FineTune | None]:
    """The checks of train() before anything is built -> (the ModelConfig to train, the fine-tuning
    plan of `init` or None). model_config None: the init folder's (with the task's window)."""
    if model is not None and init is not None:
        raise ValueError("train(): give model= or init=, not both")
    ft = fine_tune(init, tc)
    if model_config is None:
        if ft is None:
            raise ValueError("train(): model_config is needed unless init= names a model folder")
        model_config = ft.config.replace(window=task.window)
    mc = resolve_model_config(task, model_config, {}) if isinstance(model_config, str) else model_config
    check_task_config(task, mc)
    if ft is not None:
        check_init_config(ft, mc)
    if model is not None and model.config != mc:
        raise ValueError("train(model=...): model.config differs from model_config")
    if tc.dtype == "float16":
        raise ValueError("TrainConfig.dtype='float16' is not supported for training (no loss scaling); "
                         "use 'bfloat16' or 'float32'")
    ckpt_dir = Path(out_dir) / CHECKPOINT_DIR
    for folder in (ckpt_dir, Path(out_dir) / MODEL_DIR):  # finish or clean up writes of a killed run
        recover_folder(folder)
    if not resume and ckpt_dir.exists():
        raise ValueError(f"{ckpt_dir} already exists; pass resume=True (--resume) to continue it "
                         "or choose another output folder")
    return mc, ft


def resume_state(out_dir, backend: str, mc: ModelConfig, task, tc: TrainConfig, *, announce: bool = True,
                 ft: FineTune | None = None) -> dict:
    """trainer_state.json of out_dir/checkpoint, checked against this run; prints the resume line.

    A checkpoint converted from the other backend (convert/, "converted_from") resumes exactly but
    for the RNG: torch and MLX generators cannot take each other's state, so this backend's starts
    from TrainConfig.seed (training draws no random numbers today, so the losses do not change).
    """
    ckpt_dir = Path(out_dir) / CHECKPOINT_DIR
    state = read_trainer_state(ckpt_dir, backend)
    check_resume(state, mc, task)
    check_base(ckpt_dir, state, ft, tc)
    changed = changed_train_fields(state, tc)
    if announce:
        if changed:
            print(f"warning: resuming with changed TrainConfig fields {changed}; the run will not match "
                  "an uninterrupted one", file=sys.stderr)
        line = f"resuming {ckpt_dir} at step {state['step']} of {tc.steps} (data position {state['step']})"
        source = state.get("converted_from")
        if source and source != backend:
            line += (f"; converted from {source}: weights, optimizer state, schedule and data position carry "
                     f"over, the {source} RNG state does not ({backend}'s generator starts from seed {tc.seed})")
        print(line, file=sys.stderr)
    return state


def run_loop(task, mc: ModelConfig, tc: TrainConfig, out_dir, *, backend: str,
             step: Callable[[int, Batch, int], StepResult], evaluate: Callable[[], dict],
             save_checkpoint: Callable, save_model: Callable, rng: Callable[[], dict], start: dict | None = None,
             rank: int = 0, world: int = 1, progress: bool = True, max_steps: int | None = None,
             tokenizer: dict | None = None, memory: Callable[[], int] = peak_rss_bytes) -> dict:
    """Algorithm 1's outer loop, the same for both backends; the backend brings the framework parts.

    step(s, batch, global_count): one optimizer step on this rank's rows of step s's batch (train_step);
    evaluate(): the eval scores; save_checkpoint(folder, trainer_state, tokenizer=) and
    save_model(folder, tokenizer=, task=): the backend's writers; rng(): generator states;
    start: trainer_state.json to resume from (model and optimizers already loaded); tokenizer: the
    tokenizer block of the run's folders (default: the task's); memory(): peak memory in bytes so far
    (logged as peak_mem_mib with tokens_per_s). Files are written by rank 0 only. Returns the summary
    that train() returns.
    """
    out_dir = Path(out_dir)
    ckpt_dir, model_dir = out_dir / CHECKPOINT_DIR, out_dir / MODEL_DIR
    first, last = rank_rows(tc.batch_size, rank, world)
    micro_rows(last - first, tc.grad_accum)  # refuse a batch that does not split before writing anything
    end = min(tc.steps, max_steps) if max_steps is not None else tc.steps
    s, elapsed_before, loss, last_eval = 0, 0.0, float("nan"), {}
    if start is not None:
        s, elapsed_before = start["step"], start["elapsed"]
        loss, last_eval = start["metrics"].get("loss", loss), start["metrics"].get("eval", {})
    lead, tokenizer = rank == 0, tokenizer if tokenizer is not None else task.tokenizer.to_dict()
    log = MetricsLog(out_dir / METRICS_FILE, s if start is not None else None) if lead else None
    start_step, t_start = s, time.perf_counter()
    t_log, tokens_since_log = t_start, 0
    with tqdm(total=end, initial=s, desc="train", disable=not progress or not lead, dynamic_ncols=True) as bar:
        while s < end:
            batch, global_count = batch_for_step(task, tc, s, rank, world)
            try:
                result = step(s, batch, global_count)
            except TrainingError as e:  # before the update: what is on disk is the last good state
                raise TrainingError(f"{e}; last good checkpoint: {ckpt_dir if ckpt_dir.exists() else 'none'}") from None
            s, loss = s + 1, result.loss
            tokens_since_log += batch.tokens.size * world
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}",
                            tok_s=f"{batch.tokens.size * world / max(result.fwd_bwd_s + result.optimizer_s, 1e-9):.0f}",
                            mem=f"{memory() / 2**20:.0f}MiB")
            if not lead:
                continue
            evaluate_now = bool(tc.eval_interval) and (s % tc.eval_interval == 0 or s == end)
            if evaluate_now:
                last_eval = evaluate()
            if s % tc.log_interval == 0 or evaluate_now or s == end:
                now = time.perf_counter()
                record = {"step": s, "loss": loss, "lr": tc.muon_lr * result.lr_factor,
                          "lr_adamw": tc.adamw_lr * result.lr_factor, "grad_norm": result.grad_norm,
                          "tokens_per_s": tokens_since_log / max(now - t_log, 1e-9),
                          "peak_mem_mib": memory() / 2**20, "elapsed": elapsed_before + now - t_start}
                if evaluate_now:
                    record.update({f"eval_{k}": v for k, v in last_eval.items()})
                log.write(record)
                t_log, tokens_since_log = now, 0
            if (tc.save_interval and s % tc.save_interval == 0) or s == end:
                doc = trainer_state(backend=backend, step=s, model_config=mc, train_config=tc, task=task, rng=rng(),
                                    elapsed=elapsed_before + time.perf_counter() - t_start,
                                    metrics={"loss": loss, "eval": last_eval})
                save_checkpoint(ckpt_dir, doc, tokenizer=tokenizer)
                save_model(model_dir, tokenizer=tokenizer, task={"name": task.name, "params": task.params})
    if lead and start is not None and s == start_step:
        # Resumed at the end: a kill after the last checkpoint but before model/ was rewritten left model/
        # at an earlier save; write it again from the checkpoint's weights.
        save_model(model_dir, tokenizer=tokenizer, task={"name": task.name, "params": task.params})
    wall = time.perf_counter() - t_start
    done_tokens = (s - start_step) * tc.batch_size * (task.seq_len or 0)
    return {"step": s, "loss": loss, "eval": last_eval, "tokens_per_s": done_tokens / max(wall, 1e-9),
            "peak_mem_mib": memory() / 2**20, "wall_time": wall, "elapsed": elapsed_before + wall, "out_dir": str(out_dir),
            "checkpoint": str(ckpt_dir), "model": str(model_dir)}


__all__ = ["CHECKPOINT_DIR", "MODEL_DIR", "METRICS_FILE", "TRAINER_STATE_FILE", "OPTIMIZER_FILE",
           "OPTIMIZER_JSON", "EVAL_SEED", "OPTIMIZER_STATE", "TrainingError", "StepResult", "is_muon_param",
           "optimizer_params", "optimizer_tensor_name", "split_optimizer_tensor_name", "optimizer_document",
           "check_optimizer_state", "lr_at", "data_seed", "rank_rows", "micro_rows", "counted_targets",
           "batch_for_step", "resolve_model_config", "check_task_config", "MetricsLog", "parse_metrics",
           "read_metrics",
           "trainer_state", "write_trainer_state", "read_trainer_state", "check_resume", "changed_train_fields",
           "check_finite", "prepare_run", "resume_state", "run_loop", "scheduled_lrs", "evaluate_batches", "main",
           "write_checkpoint", "read_checkpoint", "BASE_KEY", "FineTune", "fine_tune", "trainable_names",
           "weights_sha256", "check_init_config", "check_checkpoint_weights", "check_base", "checkpoint_extra",
           "task_defaults", "peak_rss_bytes"]
