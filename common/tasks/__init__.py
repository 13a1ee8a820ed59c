"""Task generators (SPEC section 6): `make(name, **params) -> Task`.

    task = make("depo", k=8)
    batch = task.sample(128, seed=0)        # batch.tokens int32 [n, T], batch.loss_mask bool [n, T]
    scores = task.score(logits, batch)      # logits[:, t] predicts tokens[:, t+1]
    make(task.name, **task.params)          # rebuilds the same task (params are JSON-serializable)

Formats, defaults and chance levels: docs/TASKS.md.
"""

from __future__ import annotations

import inspect

from common.tasks.base import Batch, Task
from common.tasks.depo import DepoTask
from common.tasks.gsm import GsmTask
from common.tasks.gsm_infinite import GsmInfiniteTask
from common.tasks.recall import RecallTask
from common.tasks.rule110 import Rule110Task, rule110_majority_baseline
from common.tasks.text import TextTask

TASKS: dict[str, type[Task]] = {
    "rule110": Rule110Task,
    "depo": DepoTask,
    "gsm": GsmTask,
    "text": TextTask,
    "gsm-infinite": GsmInfiniteTask,
    "recall": RecallTask,
}


def make(name: str, **params) -> Task:
    """Build task `name`; unknown names or parameters raise ValueError naming them."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r} (known: {', '.join(TASKS)})")
    cls = TASKS[name]
    signature = inspect.signature(cls.__init__)
    known = [p for p in signature.parameters if p != "self"]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(map(repr, unknown))} for task {name!r} "
                         f"(known: {', '.join(known)})")
    missing = [p.name for p in signature.parameters.values()
               if p.name != "self" and p.default is inspect.Parameter.empty and p.name not in params]
    if missing:
        raise ValueError(f"task {name!r} needs parameter(s) {', '.join(missing)}")
    return cls(**params)


__all__ = ["TASKS", "Batch", "Task", "make", "rule110_majority_baseline"]
