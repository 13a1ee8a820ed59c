"""`make demo`: a short end-to-end look at a sleeping model on the embedded default (Rule 110).

Shows the task as the model sees it, then streams several windows through a small model with
N = 1 and N = 4 and reports the sleeps, the bounded State and the effect of sleep on the logits.
"""

from __future__ import annotations

import time

import click

from common.config import ModelConfig
from common.tasks import make
from common.tasks.render import render_example


def run_demo(passes: tuple[int, ...] = (1, 4), seed: int = 0) -> dict:
    import torch

    from sleep_torch import HybridLM

    task = make("rule110", steps=2)
    batch = task.sample(4, seed)
    click.echo(f"Task: {task!r}, window L={task.window}, T={batch.tokens.shape[1]}")
    click.echo(render_example(task, batch, 0) + "\n")
    config = ModelConfig.from_name("small-rule110", vocab_size=task.vocab_size, window=task.window)
    click.echo(f"Model: small-rule110 ({config.layer_types}, d_model={config.d_model}, L={config.window})")
    model = HybridLM(config, seed=seed).eval()
    tokens = torch.as_tensor(batch.tokens, dtype=torch.long)
    results = {}
    with torch.no_grad():
        for n in passes:
            start = time.perf_counter()
            state = model.new_state(tokens.shape[0])
            logits, state = model.step(tokens, state, passes=n)
            results[n] = dict(logits=logits, sleeps=state.sleeps, bytes=state.nbytes(),
                              seconds=time.perf_counter() - start)
            click.echo(f"  N={n}: streamed {tokens.shape[1]} tokens, {state.sleeps} sleeps, "
                       f"State {state.nbytes() / 1024:.1f} KiB, {results[n]['seconds'] * 1e3:.0f} ms")
    a, b = results[passes[0]]["logits"], results[passes[-1]]["logits"]
    L = task.window
    click.echo(f"First window identical for N={passes[0]} and N={passes[-1]}: "
               f"{bool(torch.equal(a[:, :L], b[:, :L]))}; later windows differ by up to "
               f"{(a[:, L:] - b[:, L:]).abs().max().item():.3f} (sleep wrote them into the SSM state).")
    return results
