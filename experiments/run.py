"""Run the experiments of experiments/grid.py: `python -m experiments.run [--jobs 2] [--only REGEX]`.

Each run trains (`lmsleep train`, resumed from its checkpoint if one exists) and is then evaluated at
N = 1..4 (`lmsleep eval`). Finished runs (their eval.json exists) are skipped, so the command can be
stopped and restarted. Jobs run as separate processes with one intra-op thread each
(OMP_NUM_THREADS=1): on this 2-core machine, `--jobs 2` keeps both cores busy without the thread
contention that slows two 2-thread torch processes down. Logs go to ROOT/logs/NAME.log.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from common.checkpoint import read_json_file
from common.training import CHECKPOINT_DIR, TRAINER_STATE_FILE
from experiments.grid import command, runs

ROOT = "runs/experiments"


def lmsleep(argv: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("a") as f:
        f.write(f"$ {command(argv)}\n")
        f.flush()
        rc = subprocess.call([sys.executable, "-m", "lmsleep", *argv], stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc:
        raise RuntimeError(f"`{command(argv)}` exited {rc}; see {log}")


def trained_steps(folder: Path) -> int:
    """Optimizer steps in the run's last checkpoint (0 if none). The trainer refreshes model/ at every
    checkpoint, so model/ existing does not mean the run finished."""
    path = folder / CHECKPOINT_DIR / TRAINER_STATE_FILE
    return int(read_json_file(path, "no checkpoint").get("step", 0)) if path.is_file() else 0


def run_one(run, root: str) -> str:
    folder = Path(root) / run.name
    log = Path(root) / "logs" / f"{run.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    if trained_steps(folder) < run.steps:
        argv = run.train_argv(root)
        if (folder / "checkpoint").exists():
            argv.append("--resume")
        lmsleep(argv, log)
    lmsleep(run.eval_argv(root), log)
    return run.name


def main(args=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__.split("\n")[0])
    p.add_argument("--root", default=ROOT, help=f"output folder (default {ROOT})")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (default 2)")
    p.add_argument("--only", action="append", default=[],
                   help="regular expression: runs whose name matches it (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    a = p.parse_args(args)
    todo = [r for r in runs() if not a.only or any(re.search(s, r.name) for s in a.only)]
    todo = [r for r in todo if not (Path(a.root) / r.name / "eval.json").exists()]
    if a.dry_run:
        for r in todo:
            print(command(r.train_argv(a.root)) + "\n" + command(r.eval_argv(a.root)))
        return 0
    failed = []
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        futures = {pool.submit(run_one, r, a.root): r.name for r in todo}
        for fut in tqdm(as_completed(futures), total=len(futures), desc="runs", unit="run"):
            try:
                tqdm.write(f"done {fut.result()}")
            except RuntimeError as e:
                failed.append(futures[fut])
                tqdm.write(f"FAILED {e}")
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
