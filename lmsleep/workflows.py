"""The library functions behind the CLI commands: build a run from flags, evaluate over N, generate.

Each takes plain values (no click), so they are usable from Python and testable without a terminal.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from common import checkpoint as ckpt
from common import training as tr
from common import validate
from common.config import ModelConfig, TrainConfig
from common.tasks import make
from common.training import build_run
from lmsleep.backends import load_backend, resolve


def one_line(e: BaseException) -> str:
    """The first line of an error's message; an OSError names its path ("runs/x: Permission denied")."""
    if isinstance(e, OSError) and e.filename is not None:
        paths = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else f"{e.filename}"
        text = f"{paths}: {e.strerror or type(e).__name__}"
    else:
        text = str(e)
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def run_train(backend: str, task, mc: ModelConfig, tc: TrainConfig, out: str, *, resume=False, progress=True,
              max_steps=None, init=None) -> dict:
    """Train with `backend` (init: a model folder to fine-tune, see common.training.build_run)."""
    return load_backend(backend).train.train(task, mc, tc, out, resume=resume, progress=progress,
                                             max_steps=max_steps, init=init)


def resume_or_start(out, resume: bool, *, note: bool = True) -> bool:
    """Whether `--resume` has a checkpoint to continue: a run killed before its first save has none,
    and starts from step 0 (with a note) instead of failing, so that a job can always be rerun with
    --resume. A replacement of OUT/checkpoint cut short by a kill is recovered first."""
    if not resume:
        return False
    ckpt_dir = Path(out) / tr.CHECKPOINT_DIR
    ckpt.recover_folder(ckpt_dir)
    if os.path.lexists(ckpt_dir):
        return True
    if note:
        print(f"note: nothing to resume in {out} (no {tr.CHECKPOINT_DIR}/ saved yet): starting from step 0",
              file=sys.stderr)
    return False


def launch_distributed(nproc: int, argv: list[str]) -> int:
    """Run `python -m sleep_torch.train ARGV` as nproc ranks of one process group on this machine
    (gloo on CPU, NCCL on GPUs; what `torchrun --standalone` does, without its report of a failed rank).
    When a rank fails (it has printed the one-line reason) the others are stopped; returns its exit
    code (2 for a user's mistake or the NaN stop), or 0."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc)}
    cmd = [sys.executable, "-m", "sleep_torch.train", *argv]
    ranks = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(nproc)]
    try:
        while True:
            codes = [p.poll() for p in ranks]
            failed = [c for c in codes if c not in (None, 0)]
            if failed or all(c == 0 for c in codes):
                return failed[0] if failed else 0
            time.sleep(0.05)
    finally:
        for p in ranks:  # a failed rank leaves the others waiting in a collective: stop them
            if p.poll() is None:
                p.terminate()
        for p in ranks:
            p.wait()


def model_task(model_dir, task_name: str | None, task_params: dict, data: str | None = None):
    """The task to evaluate on: given explicitly, or the one recorded in the model folder by the trainer.

    `data` is a data file the user names (`lmsleep eval --data`): it replaces the recorded path. A path
    recorded in config.json is resolved relative to the model folder and refused when it lies outside it
    (a config.json must not make eval read an arbitrary file); a path in `task_params` (--task-arg) is the
    user's own and used as given.
    """
    _, doc = ckpt.read_config(model_dir)
    if data is not None:
        task_params = {**task_params, "path": str(data)}
    if task_name is not None:
        return make(task_name, **task_params)
    recorded = doc.get("task")
    if not recorded:
        raise ValueError(f"{model_dir}: no task recorded in config.json; pass --task")
    if (not isinstance(recorded, dict) or not isinstance(recorded.get("name"), str)
            or not isinstance(recorded.get("params", {}), dict)):
        raise ckpt.CheckpointError(f"{Path(model_dir) / ckpt.CONFIG_FILE}: task must be "
                                   '{"name": ..., "params": {...}}')
    params = dict(recorded.get("params", {}))
    if "path" in params and "path" not in task_params:
        params["path"] = validate.task_file(model_dir, params["path"])
    return make(recorded["name"], **{**params, **task_params})


def run_eval(backend: str, model_dir, task, passes_list, *, n=512, seed=tr.EVAL_SEED, progress=True) -> list[dict]:
    """Evaluate a model folder at each N in passes_list -> one row per N."""
    b = load_backend(backend)
    model = b.load(model_dir)
    tr.check_task_config(task, model.config)
    rows = []
    for passes in passes_list or [model.config.sleep_passes]:
        scores = b.train.evaluate(model, task, n, seed, passes=passes)
        rows.append({"passes": passes, "trained_passes": model.config.sleep_passes, **scores})
    return rows


def plot_eval(rows: list[dict], path) -> Path | None:
    """Accuracy metrics vs N as a PNG; None when matplotlib is not installed."""
    from lmsleep import plots

    plt = plots.pyplot()
    if plt is None:
        return None
    keys = [k for k in rows[0] if k not in ("passes", "trained_passes", "loss", "perplexity")
            and isinstance(rows[0][k], float)]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["passes"] for r in rows]
    for k in keys:
        ax.plot(xs, [r.get(k, float("nan")) for r in rows], marker="o", label=k)
    ax.set(xlabel="sleep passes N at evaluation", ylabel="accuracy", title=f"trained with N={rows[0]['trained_passes']}")
    plots.finish(ax, legend_size=7)
    return plots.save(fig, path)


def format_table(rows: list[dict]) -> str:
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(_fmt(r.get(k))) for r in rows)) for k in keys}
    lines = ["  ".join(k.rjust(widths[k]) for k in keys)]
    lines += ["  ".join(_fmt(r.get(k)).rjust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_json(rows, path) -> None:
    ckpt.write_json(path, {"results": rows}) if str(path) != "-" else print(json.dumps(rows, indent=2))


def load_for_generation(backend: str, model_dir, dtype=None):
    """(backend namespace, model, tokenizer) for generate/chat/serve, the model laid out for decoding
    (HybridLM.for_inference); a folder without a tokenizer is refused."""
    b = load_backend(backend)
    model = b.load(model_dir, dtype=dtype) if dtype else b.load(model_dir)
    if model.tokenizer is None:
        raise ValueError(f"{model_dir}: no tokenizer in config.json (train with `lmsleep train` to get one)")
    return b, model.for_inference(), model.tokenizer


def encode_prompt(tokenizer, text: str) -> list[int]:
    if not text:
        raise ValueError("empty prompt: give some text to start from")
    return encode_text(tokenizer, text)


def encode_text(tokenizer, text: str) -> list[int]:
    """tokenizer.encode of text from a terminal or argv, where bytes that are not UTF-8 arrive as lone
    surrogates (surrogateescape): a byte-level tokenizer gets those bytes back, the others (which take
    text) get U+FFFD in their place."""
    raw = text.encode("utf-8", "surrogateescape")
    if getattr(tokenizer, "kind", None) == "byte":  # ids 0..255 are the bytes themselves
        return list(raw)
    return tokenizer.encode(raw.decode("utf-8", "replace"))


def stop_ids(tokenizer) -> list[int]:
    """Tokens that end a reply: a pretrained tokenizer's stop tokens (end of turn, eos), else eot."""
    stops = getattr(tokenizer, "stop_ids", None)
    if stops is not None:
        return [i for i in stops if i is not None]
    eot = getattr(tokenizer, "eot_id", None)
    return [eot] if eot is not None else []


def conversation_for(model_dir, tokenizer, system: str | None = None):
    """The Conversation a chat with this model folder uses: its chat template when it has one."""
    from common.conversation import Conversation

    path = Path(model_dir) / "chat_template.jinja"
    if getattr(tokenizer, "kind", None) == "hf" and path.is_file():
        from common.chat_template import ChatTemplate

        template = ChatTemplate(path.read_text(encoding="utf-8"), **tokenizer.special_tokens())
        return Conversation(template, system=system)
    newline = True
    try:
        tokenizer.encode("\n")
    except ValueError:  # a task vocabulary without a newline: a turn is the line itself
        newline = False
    return Conversation(None, system=system, newline=newline)


__all__ = ["one_line", "build_run", "run_train", "resume_or_start", "launch_distributed", "model_task", "run_eval",
           "plot_eval", "format_table", "write_json", "load_for_generation", "encode_prompt", "encode_text", "stop_ids", "conversation_for",
           "resolve"]
