"""Framework-free pieces of training that both backends share (SPEC sections 3, 5, 6).

sleep_torch/train.py and sleep_mlx/train.py hold the loops; this file fixes everything that must
be identical between them, so that a run means the same thing on either backend:

- which parameters Muon trains and which AdamW trains (`is_muon_param`),
- the learning-rate schedule (`lr_at`: a multiplier of each optimizer's peak lr),
- the data of each step (`data_seed`, `EVAL_SEED`, `rank_rows`, `micro_rows`),
- the model config a task implies (`resolve_model_config`, `check_task_config`),
- the files of a run: metrics.jsonl (`MetricsLog`), checkpoint/trainer_state.json
  (`trainer_state`, `read_trainer_state`, `check_resume`) and the optimizer tensor names.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from pathlib import Path

from common.checkpoint import CheckpointError, atomic_file, read_json_file
from common.config import PRESETS, TRAIN_PRESETS, ModelConfig, TrainConfig, parse_override, split_overrides

# --- files of a run (out_dir/...) -----------------------------------------------------------------
CHECKPOINT_DIR = "checkpoint"  # model folder + optimizer.safetensors + optimizer.json + trainer_state.json
MODEL_DIR = "model"  # plain model folder of the latest weights (with the task's tokenizer)
METRICS_FILE = "metrics.jsonl"  # one JSON object per logged step
TRAINER_STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"  # every optimizer state tensor, by name (see below)
OPTIMIZER_JSON = "optimizer.json"  # the rest of the optimizer state: hyper-parameters and scalars
TRAINER_FORMAT = "lm-sleep-trainer"
TRAINER_FORMAT_VERSION = 1

# --- which optimizer trains which parameter ---------------------------------------------------------
# Muon: the 2-D matrices inside the blocks (mixer projections and the MLP). AdamW: everything else
# (embedding, lm_head, norms, the gate projections a_proj/b_proj, conv kernels, A_log, dt_bias).
_MUON = re.compile(r"layers\.\d+\.(attn\.[qkvo]_proj|ssm\.[qkvgo]_proj|mlp\.(gate|up|down)_proj)\.weight")


def is_muon_param(name: str) -> bool:
    """True for the canonical names that Muon optimizes (block matrices), False for AdamW's."""
    return _MUON.fullmatch(name) is not None


def optimizer_tensor_name(optimizer: str, param: str, key: str) -> str:
    """Name of one optimizer state tensor in optimizer.safetensors, e.g. 'adamw.embed.weight.exp_avg'.

    Canonical parameter names make the file readable by either backend (convert/ maps the keys:
    torch AdamW exp_avg/exp_avg_sq/step = MLX m/v/step; Muon momentum_buffer = MLX v).
    """
    return f"{optimizer}.{param}.{key}"


def split_optimizer_tensor_name(name: str) -> tuple[str, str, str]:
    optimizer, rest = name.split(".", 1)
    param, key = rest.rsplit(".", 1)
    return optimizer, param, key


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


def build_run(task_name: str, task_params: dict, preset: str, overrides: dict, *, passes=None, grad_accum=None,
              steps=None, data=None):
    """(task, ModelConfig, TrainConfig) from a preset, flat key=value overrides and the task itself."""
    from common.tasks import make  # here, not at the top: tasks do not need the trainer's helpers

    if data is not None:
        task_params = {**task_params, "path": str(data)}
    task = make(task_name, **task_params)
    model_over, train_over = split_overrides(overrides)
    if passes is not None:
        model_over["sleep_passes"] = passes
    for key, value in (("grad_accum", grad_accum), ("steps", steps)):
        if value is not None:
            train_over[key] = value
    mc = resolve_model_config(task, preset, model_over)
    tc = TRAIN_PRESETS.get(preset, TrainConfig()).replace(**train_over)
    return task, mc, tc


def train_arg_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The flags of `python -m sleep_{torch,mlx}.train` (what torchrun launches)."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    p.add_argument("--task", required=True, help="task name: rule110, depo, gsm, text")
    p.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="task parameter, e.g. --task-arg steps=0 (repeatable)")
    p.add_argument("--preset", default="debug", help=f"model + train preset: {', '.join(PRESETS)}")
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
                     dict(parse_override(s) for s in args.set), steps=args.steps)


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
    file reads as one uninterrupted run.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


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


def read_trainer_state(folder: str | os.PathLike, backend: str) -> dict:
    """Read checkpoint/trainer_state.json; a checkpoint of the other backend raises ValueError."""
    path = Path(folder) / TRAINER_STATE_FILE
    doc = read_json_file(path, "no training checkpoint to resume from")
    if not isinstance(doc, dict) or doc.get("format") != TRAINER_FORMAT:
        raise CheckpointError(f"{path}: not an lm-sleep trainer state")
    if doc.get("format_version") != TRAINER_FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {doc.get('format_version')!r} is not supported")
    if doc.get("backend") != backend:
        raise ValueError(f"{folder} is a {doc.get('backend')!r} training checkpoint and this is the {backend!r} "
                         f"trainer; convert it first (convert/) or resume with the {doc.get('backend')} backend")
    return doc


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
    saved = doc["train"]
    return [k for k, v in tc.to_dict().items() if saved.get(k) != v]


__all__ = ["CHECKPOINT_DIR", "MODEL_DIR", "METRICS_FILE", "TRAINER_STATE_FILE", "OPTIMIZER_FILE",
           "OPTIMIZER_JSON", "EVAL_SEED", "is_muon_param", "optimizer_tensor_name",
           "split_optimizer_tensor_name", "lr_at", "data_seed", "rank_rows", "micro_rows",
           "resolve_model_config", "check_task_config", "MetricsLog", "read_metrics", "trainer_state",
           "write_trainer_state", "read_trainer_state", "check_resume", "changed_train_fields"]
