"""Pieces shared by the task generators: the Batch, the Task base and the scoring helpers.

Alignment (SPEC section 6): logits[:, t] predicts tokens[:, t+1]; loss_mask[:, t+1] says whether
that target counts. score() takes float logits [n, T, V] (argmax over V) or int predictions [n, T]
in the same alignment (pred[:, t] is the prediction for tokens[:, t+1]).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Batch:
    tokens: np.ndarray  # int32 [n, T]
    loss_mask: np.ndarray  # bool [n, T]; True where tokens[:, t] is a counted target
    meta: dict = field(default_factory=dict)  # name -> numpy array with leading dim n (answers, k, ops...)

    def __len__(self) -> int:
        return self.tokens.shape[0]


class Task:
    """Common attributes; each task sets them in __init__ and implements sample() and score()."""

    name: str
    params: dict  # JSON-serializable; common.tasks.make(name, **params) rebuilds the task
    tokenizer: object
    window: int  # L: the task's natural attention window
    seq_len: int | None  # T of every sample (all tasks here have a fixed T)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def sample(self, n: int, seed: int) -> Batch:
        raise NotImplementedError

    def score(self, logits_or_predictions, batch: Batch) -> dict[str, float]:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


# ---- parameter checks (errors name the task, the parameter and the value) ----

# Every integer task parameter and every example's length is bounded (docs/FORMAT.md "Limits"): a task
# recorded in a model folder's config.json is data read from disk and must not ask for 10^12 tokens.
MAX_TASK_INT = 1 << 20
MAX_TASK_TOKENS = 1 << 20  # tokens of one example (seq_len)


def check_int(task: str, name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """An integer parameter in [lo, hi] (hi defaults to MAX_TASK_INT)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{task}: {name} must be an integer, got {str(value)[:60]!r}")
    value = int(value)
    hi = MAX_TASK_INT if hi is None else hi
    if (lo is not None and value < lo) or value > hi:
        bounds = f"in [{lo}, {hi}]" if lo is not None else f"<= {hi}"
        raise ValueError(f"{task}: {name} must be {bounds}, got {value}")
    return value


def check_tokens(task: str, seq_len: int) -> int:
    """An example's length must stay within MAX_TASK_TOKENS."""
    if seq_len > MAX_TASK_TOKENS:
        raise ValueError(f"{task}: these parameters make examples of {seq_len} tokens (at most {MAX_TASK_TOKENS})")
    return seq_len


def check_range(task: str, name: str, value, lo: int) -> tuple[int, int]:
    """An int (fixed) or a pair [lo, hi] (inclusive) -> (lo, hi)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{task}: {name} must be an integer or a pair [lo, hi], got {value!r}")
        a = check_int(task, name, value[0], lo)
        b = check_int(task, name, value[1], lo)
        if a > b:
            raise ValueError(f"{task}: {name} must have lo <= hi, got {list(value)}")
        return a, b
    a = check_int(task, name, value, lo)
    return a, a


def json_range(value):
    """The JSON form stored in task.params: an int stays an int, a pair becomes a list."""
    return list(value) if isinstance(value, (list, tuple)) else int(value)


def check_sample_args(task: str, n, seed) -> tuple[int, int]:
    n = check_int(task, "n", n, 1)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"{task}: seed must be an integer, got {seed!r}")
    return n, int(seed)


# ---- scoring helpers ----

def predictions(task: str, logits_or_predictions, batch: Batch) -> np.ndarray:
    """Logits [n, T, V] (argmax) or int predictions [n, T] -> int predictions [n, T]."""
    x = np.asarray(logits_or_predictions)
    n, T = batch.tokens.shape
    if x.ndim == 3 and np.issubdtype(x.dtype, np.floating):
        pred = x.argmax(axis=-1)
    elif x.ndim == 2 and np.issubdtype(x.dtype, np.integer):
        pred = x
    else:
        raise ValueError(f"{task}: score() needs float logits [n, T, V] or int predictions [n, T], "
                         f"got {x.dtype} {list(x.shape)}")
    if pred.shape != (n, T):
        raise ValueError(f"{task}: predictions cover {list(pred.shape[:2])} but the batch is {[n, T]}")
    return pred


def answer_hits(task: str, logits_or_predictions, batch: Batch) -> np.ndarray:
    """bool [n, A]: whether each counted target (in order) is predicted right.

    Needs the same number A of counted targets in every row (true for the reasoning tasks)."""
    pred = predictions(task, logits_or_predictions, batch)
    target_mask = batch.loss_mask[:, 1:]
    hits = (pred[:, :-1] == batch.tokens[:, 1:])[target_mask]
    n = batch.tokens.shape[0]
    assert hits.size % n == 0, "rows have different numbers of answers"
    return hits.reshape(n, -1)


def grouped_accuracy(hits: np.ndarray, groups: np.ndarray, prefix: str) -> dict[str, float]:
    """Accuracy of `hits` per distinct value g of `groups` (same shape) as {prefix + str(g): acc}."""
    out = {}
    for g in np.unique(groups):
        out[f"{prefix}{int(g)}"] = float(hits[groups == g].mean())
    return out
