"""Run the CPU retrofit experiment of experiments/retrofit/grid.py:
`python -m experiments.retrofit.run [--root runs/retrofit] [--jobs 2] [--dry-run]`.

Resumable: the retrofit is built once; each training run is started with `--resume`, so an interrupted
run continues from its last checkpoint (every 5 steps) and a finished one is skipped; the final
`lmsleep sleep-eval` runs once both are done. Logs: ROOT/logs/NAME.log. Then `python -m
experiments.retrofit.report --into docs/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from experiments.retrofit import grid
from experiments.retrofit.grid import command, retrofit_argv, runs, sleep_eval_argv
from experiments.run import lmsleep, trained_steps

ROOT = "runs/retrofit"


def plan(root: str) -> list[tuple[str, list[str]]]:
    """(log name, argv) of every command still to run, in order (the two trainings may run in parallel)."""
    todo = []
    if not (Path(root) / "retrofit" / "config.json").exists():
        todo.append(("retrofit", retrofit_argv(root)))
    for r in runs():
        if trained_steps(Path(root) / r.name) < grid.STEPS:
            todo.append((r.name, r.train_argv(root) + ["--resume"]))
    if not (Path(root) / "sleep_eval.json").exists() or len(todo):
        todo.append(("sleep-eval", sleep_eval_argv(root)))
    return todo


def main(args=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.retrofit.run", description=__doc__.split("\n")[0])
    p.add_argument("--root", default=ROOT, help=f"output folder (default {ROOT})")
    p.add_argument("--jobs", type=int, default=2, help="training runs in parallel (default 2)")
    p.add_argument("--dry-run", action="store_true", help="print the commands still to run, run nothing")
    a = p.parse_args(args)
    todo = plan(a.root)
    if a.dry_run:
        for _, argv in todo:
            print(command(argv))
        return 0
    logs = Path(a.root) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    try:
        for name, argv in todo:
            if name == "retrofit":
                lmsleep(argv, logs / "retrofit.log")
        trains = [(n, argv) for n, argv in todo if n not in ("retrofit", "sleep-eval")]
        with ThreadPoolExecutor(max_workers=a.jobs) as pool:
            for fut in [pool.submit(lmsleep, argv, logs / f"{n}.log") for n, argv in trains]:
                fut.result()
        lmsleep(sleep_eval_argv(a.root), logs / "sleep-eval.log")
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
