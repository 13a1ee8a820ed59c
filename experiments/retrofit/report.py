"""The CPU retrofit experiment's table: `python -m experiments.retrofit.report [--root runs/retrofit]
[--into docs/RESULTS.md]`.

Reads ROOT/sleep_eval.json (`lmsleep sleep-eval --json`) and each run's metrics.jsonl, prints markdown:
the per-distance table with the bounds beside the trained models, the training cost (s/step measured
by the trainer) and the commands; `--into` puts it between the BEGIN/END marker lines of that file.
Before the runs finish it reports their progress (steps, s/step, last loss) instead of the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.training import read_metrics
from experiments.report import splice
from experiments.retrofit import grid
from experiments.retrofit.grid import command, retrofit_argv, runs, sleep_eval_argv
from lmsleep.sleepeval import markdown_table

ROOT = "runs/retrofit"
BEGIN, END = "<!-- BEGIN experiments.retrofit.report -->", "<!-- END experiments.retrofit.report -->"


def training_rows(root: str) -> list[str]:
    lines = ["| run | steps | train wall time (s) | s/step | last train loss | in-training eval acc |",
             "|---|---|---|---|---|---|"]
    for r in runs():
        path = Path(root) / r.name / "metrics.jsonl"
        records = read_metrics(path) if path.exists() else []
        if not records:
            lines.append(f"| N = {r.passes} | not run | | | | |")
            continue
        last = records[-1]
        evals = [rec for rec in records if "eval_acc" in rec]
        acc = f"{evals[-1]['eval_acc']:.3f} (step {evals[-1]['step']})" if evals else "-"
        lines.append(f"| N = {r.passes} | {last['step']} | {last['elapsed']:.0f} | "
                     f"{last['elapsed'] / max(last['step'], 1):.1f} | {last['loss']:.3f} | {acc} |")
    return lines


def section(root: str) -> str:
    """The markdown section; while the runs are unfinished (no sleep_eval.json yet), their progress only."""
    path = Path(root) / "sleep_eval.json"
    if not path.exists():
        if not any((Path(root) / r.name).is_dir() for r in runs()):
            raise SystemExit(f"error: nothing under {root}; run `python -m experiments.retrofit.run --root {root}`")
        return "\n".join([f"Not finished yet: the training runs so far (of {grid.STEPS} steps); "
                          "`python -m experiments.retrofit.run` continues them from their last checkpoint, then "
                          "evaluates, and this report then shows the table.", "", *training_rows(root)]) + "\n"
    rows = json.loads(path.read_text())["results"]
    lines = [f"`{grid.SOURCE}` (bundled GGUF) retrofitted, hard eviction, window {grid.TASK_ARGS['window']}; "
             f"`--freeze base` (only the inserted SSM blocks learn); recall with facts k in {grid.TASK_ARGS['k']} "
             f"windows before their question; {grid.STEPS} steps x {grid.BATCH} sequences, the same data for every N. "
             f"Accuracy on {grid.EVAL_N} held-out examples (teacher-forced exact answer): `whole context` is the upper "
             "bound (nothing evicted), `evicted, untrained` the lower bound (an evicted fact is gone).", "",
             markdown_table(rows), "", *training_rows(root), "", "```",
             command(retrofit_argv(root)), *(command(r.train_argv(root)) for r in runs()),
             command(sleep_eval_argv(root)), "```"]
    return "\n".join(lines) + "\n"


def main(args=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.retrofit.report", description=__doc__.split("\n")[0])
    p.add_argument("--root", default=ROOT, help=f"the runs (default {ROOT})")
    p.add_argument("--into", help=f"put the section into this markdown file between {BEGIN!r} and {END!r}")
    a = p.parse_args(args)
    text = section(a.root)
    print(text)
    if a.into:
        splice(Path(a.into), text, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
