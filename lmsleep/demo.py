"""`make demo`: train the same small hybrid on Rule 110 with N = 1 (no sleep) and N = 4 (sleep),
for the same number of steps, then compare accuracy and wall time (a short, single-seed run: noisy).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from common import training as tr
from common.tasks import make
from common.tasks.render import render_example
from lmsleep import workflows as wf

DEMO_TASK = {"steps": 1}  # Rule 110 depth t: the answer is the first bit after one automaton step
DEMO_PRESET = "small-rule110"  # ASAS, width 64 (PAPER.md "observed at laptop scale")


def run_demo(out: str = "runs/demo", *, passes=(1, 4), steps: int = 200, batch_size: int = 32,
             backend: str = "auto", seed: int = 0) -> list[dict]:
    task = make("rule110", **DEMO_TASK)
    click.echo(f"Task {task!r}: 4 random 24-bit states, one per window (L = {task.window}); then '|' and the")
    click.echo("first bit of each state after t Rule-110 steps. Evicted windows survive only in the SSM state.")
    click.echo(render_example(task, task.sample(1, seed), 0) + "\n")
    overrides = {"batch_size": batch_size, "eval_interval": max(steps // 4, 1), "eval_samples": 256,
                 "save_interval": 0, "seed": seed, "warmup_steps": 20}
    rows = []
    for n in passes:
        run_dir = Path(out) / f"n{n}"
        task, mc, tc = tr.build_run("rule110", DEMO_TASK, DEMO_PRESET, overrides, passes=n, steps=steps)
        click.echo(f"Training N={n}: {mc.layer_types}, d_model={mc.d_model}, batch {tc.batch_size}, {tc.steps} steps "
                   f"-> {run_dir}")
        start = time.perf_counter()
        resume = wf.resume_or_start(run_dir, True, note=False)  # re-running continues (also after a kill)
        summary = wf.run_train(backend, task, mc, tc, str(run_dir), resume=resume)
        ev = summary["eval"]
        rows.append({"N": n, "exact": ev["exact"], "per_answer": ev["per_answer"],
                     "majority_exact": ev["majority_exact"], "wall_s": round(time.perf_counter() - start, 1)})
    click.echo("\n" + wf.format_table(rows))
    click.echo("exact = all 4 answers right; majority_exact = always answering the more common bit (the real "
               "chance level).\nOne seed and a few hundred steps: expect noise; repeat with --seed 1, 2 ... "
               "before drawing a conclusion.")
    plot = plot_curves(out, passes)
    if plot:
        click.echo(f"plot: {plot}")
    (Path(out) / "demo.json").write_text(json.dumps(rows, indent=2))
    best = Path(out) / f"n{passes[-1]}" / tr.MODEL_DIR
    click.echo(f"\nNext:\n  .venv/bin/lmsleep eval {best} --passes 1 --passes 2 --passes 4   # the same model at other N\n"
               f"  .venv/bin/lmsleep chat {best} --max-tokens 4    # type 24-bit states; it sleeps every window\n"
               f"  .venv/bin/lmsleep generate {best} --prompt 011010011101001110100101 --max-tokens 24\n"
               f"  .venv/bin/lmsleep convert {best} {out}/n{passes[-1]}-mlx --to mlx    # then chat on a Mac\n"
               f"The full experiments (Rule 110 t = 1, 2 with 2-3 seeds per N, Depo): docs/RESULTS.md, "
               f"`make experiments`.\nThey find no measurable N = 4 advantage at this scale: outcomes depend on the seed.")
    return rows


def plot_curves(out: str, passes) -> Path | None:
    """Eval exact accuracy vs step for each N (None when matplotlib is missing)."""
    from lmsleep import plots

    plt = plots.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for n in passes:
        records = [r for r in tr.read_metrics(Path(out) / f"n{n}" / tr.METRICS_FILE) if "eval_exact" in r]
        ax.plot([r["step"] for r in records], [r["eval_exact"] for r in records], marker="o", label=f"N={n}")
        if records:
            ax.axhline(records[-1]["eval_majority_exact"], color="gray", ls=":", lw=1)
    ax.set(xlabel="training step", ylabel="exact accuracy (4 answers)",
           title=f"Rule 110, t={DEMO_TASK['steps']} (dotted: majority baseline)")
    plots.finish(ax)
    return plots.save(fig, Path(out) / "demo.png")
