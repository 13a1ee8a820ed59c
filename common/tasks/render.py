"""Human-readable view of an example: one line per window, answer tokens in [brackets]."""

from __future__ import annotations

from common.tasks.base import Batch, Task


def render_example(task: Task, batch: Batch, i: int) -> str:
    tokens, mask = batch.tokens[i].tolist(), batch.loss_mask[i].tolist()
    sep = getattr(task.tokenizer, "sep", "")
    L = task.window
    lines = []
    for w, start in enumerate(range(0, len(tokens), L)):
        parts = []
        for t in range(start, min(start + L, len(tokens))):
            text = task.tokenizer.decode([tokens[t]])
            parts.append(f"[{text}]" if mask[t] else text)
        lines.append(f"w{w:<3d}| " + sep.join(parts))
    return "\n".join(lines)
