"""What sleep bought: one table of a task's scores per difficulty, with the bounds beside the trained models.

Rows (one per model and evaluation N; columns are the task's metrics, e.g. recall's acc_k1, acc_k2, ...):

- `whole context` (the upper bound): the base model with its attention window widened to the whole
  sequence, so nothing is ever evicted (one window: no sleep either);
- `evicted, untrained` (the lower bound): the retrofitted folder before any training, at its window:
  its inserted SSM blocks write nothing yet (`ssm.o_proj` = 0), so evicted windows are simply lost;
- `trained N=n`: each trained folder, at its window, evaluated at every N asked for (its own and the others);
- with `whole_trained`, also `trained N=n, whole context`: each trained folder without eviction, the ceiling
  of that fine-tuned model (the base's own ceiling can be lower: SmolLM2-135M-Instruct, for one, answers
  "Answer:" with a newline first, which a teacher-forced exact match counts as wrong, whatever it read).

Every row at a folder's own window is `lmsleep.workflows.run_eval` itself, so its numbers equal
`lmsleep eval FOLDER --passes N` on the same examples (the same seed and n).

`eval_batch` (`--eval-batch`): for long sequences with a large vocabulary, where keeping every logit is
impossible (evaluate keeps n x T x V float32 logits: 512 GSM-Infinite problems of 3,300 tokens in Qwen's
151,936-token vocabulary would be 1 TB), the examples are scored `eval_batch` at a time and only their
argmax predictions are kept: the same accuracies (every scorer of a reasoning task takes predictions too)
and the same mean loss up to float rounding. Not for the text task, whose perplexity needs the logits.

Why widening the window is exact: the window L decides where a window ends and its sleep falls due
(and, in sliding mode, how far back attention reaches); the weights do not depend on it. With L >= T
the whole sequence is one window: no sleep and no eviction ever happens, and the mask is plain causal
attention, which is what the source model computes on the whole sequence (positions count from the
window start, i.e. from 0).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np

from common import checkpoint as ckpt
from common import training as tr
from common.tasks.base import Batch
from lmsleep import workflows as wf
from lmsleep.backends import load_backend

WHOLE, EVICTED = "whole context", "evicted, untrained"
_DIFFICULTY = re.compile(r"acc_([a-z]+)(\d+)")  # acc_k2, acc_op6, acc_facts3, acc_hops1


def widen_window(model, window: int):
    """A copy of the loaded `model` with attention window `window` (>= its own), built from the widened
    config (so every size derived from the window, such as a preallocated KV cache, follows) with the
    same weights, tokenizer and chat template. Either backend."""
    if window < model.config.window:
        raise ValueError(f"window {window} is smaller than the model's ({model.config.window})")
    if hasattr(model, "named_parameters"):  # torch
        arrays = {name: p.detach() for name, p in model.named_parameters()}
    else:  # MLX
        from mlx.utils import tree_flatten

        arrays = dict(tree_flatten(model.parameters()))
    wide = type(model)(model.config.replace(window=window), seed=None)
    if hasattr(wide, "to"):
        wide.to(dtype=next(iter(arrays.values())).dtype, device=next(iter(arrays.values())).device)
    wide.load_arrays(arrays)
    wide.tokenizer, wide.chat_template = model.tokenizer, model.chat_template
    return wide


def is_model_folder(path) -> bool:
    """An lm-sleep model folder (config.json with format lm-sleep), as opposed to a retrofit source."""
    config = Path(path) / ckpt.CONFIG_FILE
    if not config.is_file():
        return False
    doc = ckpt.read_json_file(config, "unreadable config.json")
    return isinstance(doc, dict) and doc.get("format") == ckpt.FORMAT


class _Rows:
    """A task whose `sample` returns fixed rows of a batch and whose `score` returns argmax predictions:
    lets the backend's own `evaluate` run the model on a slice without keeping its logits."""

    def __init__(self, batch: Batch):
        self.batch = batch

    def sample(self, n, seed):
        return self.batch

    def score(self, logits, batch):
        return {"pred": np.asarray(logits).argmax(-1).astype(np.int32)}


def evaluate(b, model, task, n: int, seed: int, passes: int, eval_batch: int | None = None) -> dict:
    """The backend's `evaluate(model, task, n, seed, passes)`, or the same scores computed `eval_batch`
    examples at a time from argmax predictions (see the module docstring)."""
    if eval_batch is None or eval_batch >= n:
        return b.train.evaluate(model, task, n, seed, passes=passes)
    if task.name == "text":
        raise ValueError("--eval-batch needs a task scored on predictions; the text task needs the logits")
    batch = task.sample(n, seed)
    preds, loss_sum, count = [], 0.0, 0
    for i in range(0, n, eval_batch):
        rows = Batch(batch.tokens[i:i + eval_batch], batch.loss_mask[i:i + eval_batch])
        out = b.train.evaluate(model, _Rows(rows), len(rows), seed, passes=passes, batch_size=eval_batch)
        c = int(rows.loss_mask[:, 1:].sum())  # counted targets (logits[:, t] predicts tokens[:, t+1])
        preds.append(out["pred"])
        loss_sum, count = loss_sum + out["loss"] * c, count + c
    return {**task.score(np.concatenate(preds), batch), "loss": loss_sum / max(count, 1)}


def whole_context_row(backend: str, folder, task, *, n: int, seed: int, eval_batch: int | None = None) -> dict:
    """The upper bound: `folder` evaluated with no eviction (window widened to the sequence length)."""
    b = load_backend(backend)
    model = b.load(folder)
    if model.config.vocab_size != task.vocab_size:
        raise ValueError(f"{folder}: vocab_size {model.config.vocab_size} != task {task.name!r} ({task.vocab_size})")
    model = widen_window(model, max(task.seq_len, model.config.window))
    scores = evaluate(b, model, task, n, seed, 1, eval_batch)
    return {"model": WHOLE, "folder": str(folder), "eviction": "none", "window": model.config.window,
            "trained_passes": None, "passes": 1, **scores}


def folder_rows(backend: str, label: str, folder, task, passes_list, *, n: int, seed: int,
                eval_batch: int | None = None) -> list[dict]:
    """run_eval's rows for one folder at its own window, labelled."""
    if eval_batch is None:
        rows = wf.run_eval(backend, folder, task, list(passes_list), n=n, seed=seed)
    else:  # run_eval, `eval_batch` examples at a time
        b = load_backend(backend)
        model = b.load(folder)
        tr.check_task_config(task, model.config)
        rows = [{"passes": p, "trained_passes": model.config.sleep_passes,
                 **evaluate(b, model, task, n, seed, p, eval_batch)} for p in passes_list]
    _, doc = ckpt.read_config(folder)
    model = doc["model"]
    return [{"model": label, "folder": str(folder), "eviction": model.get("eviction", "hard"),
             "window": model["window"], **row} for row in rows]


def sleep_eval(backend: str, task, *, retrofit, trained=(), base=None, passes=(1, 2, 4), n: int = 64,
               seed: int = tr.EVAL_SEED, lower_passes=(1,), eval_batch: int | None = None,
               whole_trained: bool = False, progress=None) -> list[dict]:
    """All rows (see the module docstring). `base`: a model folder (evaluated widened) or a retrofit source
    (a GGUF, HF folder, Hub id or bundled name: retrofitted with window = T into a temporary folder);
    None = the `retrofit` folder itself, which equals its source on a window that holds the sequence.
    `lower_passes`: N for the untrained retrofit (all N give the same numbers while `ssm.o_proj` = 0).
    `eval_batch`: score that many examples at a time, keeping predictions only (long sequences, big vocabularies)."""
    kw = {"n": n, "seed": seed, "eval_batch": eval_batch}
    say = progress or (lambda message: None)
    say(f"{WHOLE}: {base or retrofit}")
    if base is None or is_model_folder(base):
        rows = [whole_context_row(backend, base or retrofit, task, **kw)]
    else:
        from convert.retrofit import retrofit as build

        with tempfile.TemporaryDirectory(prefix="lmsleep-base-") as tmp:
            build(base, Path(tmp) / "base", window=task.seq_len, passes=1, backend="torch" if backend == "auto"
                  else backend)
            rows = [whole_context_row(backend, Path(tmp) / "base", task, **kw)]
            rows[0]["folder"] = str(base)
    say(f"{EVICTED}: {retrofit}")
    rows += folder_rows(backend, EVICTED, retrofit, task, lower_passes, **kw)
    for folder in trained:
        _, doc = ckpt.read_config(folder)
        label = f"trained N={doc['model'].get('sleep_passes', 1)}"
        say(f"{label}: {folder}")
        rows += folder_rows(backend, label, folder, task, passes, **kw)
        if whole_trained:
            row = whole_context_row(backend, folder, task, **kw)
            rows.append({**row, "model": f"{label}, {WHOLE}", "trained_passes": doc["model"].get("sleep_passes", 1)})
    return rows


def difficulty_keys(rows: list[dict]) -> list[str]:
    """The per-difficulty metrics of the first kind the task reports (recall: acc_k*, gsm: acc_op*),
    in numeric order; [] for a task without them."""
    keys = [k for k in rows[0] if _DIFFICULTY.fullmatch(k)]
    if not keys:
        return []
    kind = _DIFFICULTY.fullmatch(keys[0]).group(1)
    found = {int(m.group(2)): k for r in rows for k in r if (m := _DIFFICULTY.fullmatch(k)) and m.group(1) == kind}
    return [found[d] for d in sorted(found)]


def table_keys(rows: list[dict]) -> list[str]:
    """Columns of the printed table: who, then the difficulties, then the summary metrics."""
    head = ["model", "window", "trained_passes", "passes"]
    per = difficulty_keys(rows)
    rest = [k for k in ("acc", "exact", "per_answer", "chance", "nomem", "loss", "perplexity") if k in rows[0]]
    return head + per + [k for k in rest if k not in per]


def format_table(rows: list[dict]) -> str:
    """Plain-text table (the terminal)."""
    return wf.format_table([{k: r.get(k) for k in table_keys(rows)} for r in rows])


def markdown_table(rows: list[dict]) -> str:
    """The same table in markdown (docs/RESULTS.md)."""
    keys = table_keys(rows)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join("-" if r.get(k) is None else _cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def _cell(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def plot(rows: list[dict], path, title: str = "") -> Path | None:
    """Left: accuracy per difficulty, one line per row (the bounds dashed); right: each row's mean loss on the
    answers (it separates the bounds even where exact accuracy is 0). None without matplotlib."""
    from lmsleep import plots

    plt = plots.pyplot()
    if plt is None:
        return None
    per = difficulty_keys(rows)
    metric = next((k for k in ("acc", "exact", "perplexity") if k in rows[0]), "loss")
    keys = per or [metric]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    xs = list(range(len(keys)))
    labels = []
    for r in rows:
        bound = r["model"] in (WHOLE, EVICTED) or r["model"].endswith(WHOLE)
        label = r["model"] if r["model"] in (WHOLE, EVICTED) else f"{r['model']}, eval N={r['passes']}"
        labels.append(label)
        ax.plot(xs, [r.get(k, float("nan")) for k in keys], "--" if bound else "-", marker="o",
                color={WHOLE: "k", EVICTED: "tab:gray"}.get(r["model"]), label=label)
    ax.set_xticks(xs, [k.removeprefix("acc_") for k in keys])
    ax.set(xlabel="difficulty" if per else "", ylabel="accuracy" if per else metric, title=title)
    plots.finish(ax, legend_size=7)
    if "loss" in rows[0]:
        ys = list(range(len(rows)))[::-1]
        bx.barh(ys, [r["loss"] for r in rows], color=["k" if r["model"] == WHOLE else "tab:gray" if r["model"] ==
                                                      EVICTED else "tab:blue" for r in rows])
        bx.set_yticks(ys, labels, fontsize=7)
        bx.set(xlabel="loss on the answers (nats)", title="mean loss")
        bx.grid(alpha=0.3)
    else:
        bx.set_axis_off()
    return plots.save(fig, path)


__all__ = ["WHOLE", "EVICTED", "evaluate", "widen_window", "is_model_folder", "whole_context_row", "folder_rows",
           "sleep_eval",
           "difficulty_keys", "table_keys", "format_table", "markdown_table", "plot"]
