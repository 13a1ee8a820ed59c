"""Tables and plots of the experiments: `python -m experiments.report [--root runs/experiments]`.

Reads ROOT/<run>/metrics.jsonl and eval.json of the runs in experiments/grid.py (missing runs are
left out), prints markdown tables and writes them, with a compact JSON of every number, to
experiments/results/; the plots go to docs/results/ (needs matplotlib).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

from common.tasks.rule110 import rule110_step
from common.training import read_metrics
from experiments.grid import (DEPO_ARGS, DEPO_PASSES, EVAL_N, LONG_DEPTH, LONG_PASSES, LONG_SEEDS, LONG_STEPS,
                              LR_SWEEP, RULE110_DEPTHS, RULE110_PASSES, RULE110_STEPS, SEEDS, command, runs)
from lmsleep import plots as pl

ROOT = "runs/experiments"
TABLES = Path("experiments/results")
PLOTS = Path("docs/results")
DEPO_KS = (1, 2, 4, 8, 16)


def load(root: str) -> dict:
    """{run name: {"run", "curve": eval records, "wall_s", "eval": {N: row}}} for finished runs."""
    out = {}
    for r in runs():
        folder = Path(root) / r.name
        if not (folder / "eval.json").exists():
            continue
        records = read_metrics(folder / "metrics.jsonl")
        curve = [{k: v for k, v in rec.items() if k in ("step", "elapsed") or k.startswith("eval_")}
                 for rec in records if any(k.startswith("eval_") for k in rec)]
        rows = json.loads((folder / "eval.json").read_text())["results"]  # `lmsleep eval --json FILE`
        out[r.name] = {"run": r, "curve": curve, "wall_s": records[-1]["elapsed"],
                       "eval": {row["passes"]: row for row in rows}}
    return out


def depo_chance() -> float:
    """Uniform guess over the cycle's nodes, averaged over the cycle size n ~ U[min_nodes, max_nodes]."""
    sizes = np.arange(DEPO_ARGS["min_nodes"], DEPO_ARGS["max_nodes"] + 1)
    return float(np.mean(1.0 / sizes))


def fmt(x: float) -> str:
    return f"{x:.3f}"


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else fmt(values[0])


def run_row(label, seed, r, n) -> str:
    e = r["eval"][n]
    return (f"| {label} | {seed} | {fmt(e['exact'])} | {fmt(e['per_answer'])} | {fmt(e['majority_exact'])} | "
            f"{r['wall_s']:.0f} | {r['wall_s'] / r['run'].steps:.2f} |")


ROW_HEAD = ["| N | seed | exact | per answer | majority exact | train wall time (s) | s/step |",
            "|---|---|---|---|---|---|---|"]


def rule110_tables(res: dict) -> list[str]:
    lines = []
    for t in RULE110_DEPTHS:
        title = f"### Rule 110, t = {t}, {RULE110_STEPS} steps: final evaluation ({EVAL_N} examples, at the trained N)"
        lines += [title, "", *ROW_HEAD]
        lines += [run_row(n, s, res[f"rule110-t{t}-n{n}-s{s}"], n) for n in RULE110_PASSES for s in SEEDS
                  if f"rule110-t{t}-n{n}-s{s}" in res]
        lines += ["", f"Mean ± sd over seeds {list(SEEDS)}:", "", "| N | exact | per answer |", "|---|---|---|"]
        for n in RULE110_PASSES:
            got = [res[k] for k in (f"rule110-t{t}-n{n}-s{s}" for s in SEEDS) if k in res]
            if got:
                lines.append(f"| {n} | {mean_sd([g['eval'][n]['exact'] for g in got])} | "
                             f"{mean_sd([g['eval'][n]['per_answer'] for g in got])} |")
        lines.append("")
    return lines


def at_time(r: dict, seconds: float) -> dict | None:
    """The last in-training evaluation of run r at or before `seconds` of training."""
    before = [p for p in r["curve"] if p["elapsed"] <= seconds]
    return before[-1] if before else None


def at_text(point: dict | None) -> str:
    return f"{fmt(point['eval_exact'])} (step {point['step']})" if point else "-"


def long_tables(res: dict) -> list[str]:
    t = LONG_DEPTH
    lines = [f"### Rule 110, t = {t}, {LONG_STEPS} steps: final evaluation ({EVAL_N} examples)", "", *ROW_HEAD]
    for n in LONG_PASSES:
        lines += [run_row(n, s, res[f"rule110-t{t}-n{n}-{LONG_STEPS}steps-s{s}"], n) for s in LONG_SEEDS
                  if f"rule110-t{t}-n{n}-{LONG_STEPS}steps-s{s}" in res]
    means = []
    for n in LONG_PASSES:
        got = [res[k]["eval"][n]["exact"] for k in (f"rule110-t{t}-n{n}-{LONG_STEPS}steps-s{s}" for s in LONG_SEEDS)
               if k in res]
        if got:
            means.append(f"N = {n}: {mean_sd(got)} ({len(got)} seeds)")
    eq = res.get(f"rule110-t{t}-n1-long-s0")
    if eq:
        lines.append(run_row(f"1 ({eq['run'].steps} steps)", 0, eq, 1))
    lines += ["", "Mean ± sd of exact accuracy: " + "; ".join(means) + "."]
    lines += ["", "Equal wall time (in-training evaluations, 256 examples; the nearest one at or before the time):", "",
              ("| seed | N = 4 at its end | its wall time (s) | N = 1 at that time | N = 1 at its end "
               f"({LONG_STEPS} steps) | its wall time (s) | N = 4 at that time |"), "|---|---|---|---|---|---|---|"]
    for s in LONG_SEEDS:
        n4, n1 = (res.get(f"rule110-t{t}-n{n}-{LONG_STEPS}steps-s{s}") for n in (4, 1))
        if not (n4 and n1):
            continue
        long1 = res.get(f"rule110-t{t}-n1-long-s{s}")
        n1_then = at_time(long1, n4["wall_s"]) if long1 else None
        n4_then = at_time(n4, n1["wall_s"])
        lines.append(f"| {s} | {fmt(n4['curve'][-1]['eval_exact'])} | {n4['wall_s']:.0f} | {at_text(n1_then)} | "
                     f"{fmt(n1['curve'][-1]['eval_exact'])} | {n1['wall_s']:.0f} | {at_text(n4_then)} |")
    return lines + [""]


def cross_n_table(res: dict, prefix: str, trained: tuple, key: str) -> list[str]:
    """Rows: trained N; columns: evaluation N; cells: mean over seeds."""
    lines = [f"| trained N \\ eval N | {' | '.join(str(n) for n in range(1, 5))} |", "|---|" + "---|" * 4]
    for n in trained:
        got = [res[k] for k in (f"{prefix}-n{n}-s{s}" for s in SEEDS) if k in res]
        if got:
            cells = [fmt(np.mean([g["eval"][m][key] for g in got])) for m in range(1, 5)]
            lines.append(f"| {n} | {' | '.join(cells)} |")
    return lines + [""]


def ceiling(t: int, known: tuple[int, ...]) -> float:
    """Best per-answer accuracy of a predictor that sees only the bits at offsets `known` (from -t..t)
    of the 2t+1 that decide a Rule 110 answer after t steps (all neighbourhoods equally likely)."""
    offsets = range(-t, t + 1)
    hoods = np.array(list(itertools.product([0, 1], repeat=2 * t + 1)))  # [2^(2t+1), 2t+1]
    cells = np.zeros((len(hoods), 4 * t + 3), dtype=np.int64)  # wide enough that nothing wraps into the centre
    for j, off in enumerate(offsets):
        cells[:, off % cells.shape[1]] = hoods[:, j]
    for _ in range(t):
        cells = rule110_step(cells)
    answer = cells[:, 0]
    cols = [list(offsets).index(off) for off in known]
    hits = 0
    for key in itertools.product([0, 1], repeat=len(cols)):
        rows = np.all(hoods[:, cols] == np.array(key, dtype=np.int64), axis=1)
        hits += max(answer[rows].sum(), (1 - answer[rows]).sum())
    return hits / len(hoods)


def ceiling_table(t: int, states: int = 4) -> list[str]:
    """For each number of known bits, the best subset: where a model that stores only those bits plateaus."""
    title = f"### Rule 110, t = {t}: the best a model can score knowing only some of the {2 * t + 1} bits of an answer"
    head = f"| bits known | best offsets (0 = the state's first bit, -1 = its last) | per answer | exact (^{states}) |"
    lines = [title, "", head, "|---|---|---|---|"]
    for k in range(2 * t + 2):
        acc, best = max((ceiling(t, sub), sub) for sub in itertools.combinations(range(-t, t + 1), k))
        lines.append(f"| {k} | {list(best)} | {fmt(acc)} | {fmt(acc ** states)} |")
    return lines + [""]


def lr_table(res: dict) -> list[str]:
    rows = [(1e-2, res.get("rule110-t2-n1-s0"))] + [(lr, res.get(f"rule110-t2-n1-lr{lr:g}-s0")) for lr in LR_SWEEP]
    lines = ["### Rule 110, t = 2, N = 1, seed 0: Muon lr (AdamW lr = Muon lr / 10)", "",
             "| Muon lr | exact | per answer | majority exact |", "|---|---|---|---|"]
    for lr, r in sorted(rows, key=lambda x: x[0]):
        if r:
            e = r["eval"][1]
            lines.append(f"| {lr:g} | {fmt(e['exact'])} | {fmt(e['per_answer'])} | {fmt(e['majority_exact'])} |")
    return lines + [""]


def depo_tables(res: dict) -> list[str]:
    lines = [f"### Depo: accuracy per k at the trained N (chance, uniform over the cycle: {fmt(depo_chance())})", "",
             "| N | seed | " + " | ".join(f"k={k}" for k in DEPO_KS) + " | all k | train wall time (s) |",
             "|---|---|" + "---|" * (len(DEPO_KS) + 2)]
    for n in DEPO_PASSES:
        for s in SEEDS:
            r = res.get(f"depo-n{n}-s{s}")
            if r:
                e = r["eval"][n]
                lines.append(f"| {n} | {s} | " + " | ".join(fmt(e[f"acc_k{k}"]) for k in DEPO_KS)
                             + f" | {fmt(e['acc'])} | {r['wall_s']:.0f} |")
    return lines + [""]


def commands(res: dict, root: str) -> list[str]:
    lines = ["```"]
    for r in res.values():
        lines += [command(r["run"].train_argv(root)), command(r["run"].eval_argv(root))]
    return lines + ["```"]


def plots(res: dict, out: Path) -> list[Path]:
    plt = pl.pyplot()
    if plt is None:
        return []
    colors = {1: "tab:gray", 2: "tab:blue", 3: "tab:orange", 4: "tab:red"}
    written = []

    def finish(fig, ax, path: Path):
        if ax is not None:
            pl.finish(ax)
        written.append(pl.save(fig, path, dpi=110))

    def curves(x_key: str, fname: str, xlabel: str):
        depths = [t for t in RULE110_DEPTHS if any(name.startswith(f"rule110-t{t}-") for name in res)]
        fig, axes = plt.subplots(2, len(depths), figsize=(5 * len(depths), 7.5), squeeze=False)
        for col, t in enumerate(depths):
            for row, (metric, ylabel) in enumerate((("exact", "exact accuracy (4 answers)"),
                                                    ("per_answer", "per-answer accuracy"))):
                ax = axes[row, col]
                for n in RULE110_PASSES:
                    for s in LONG_SEEDS:
                        for suffix, style in (("", "-"), (f"-{LONG_STEPS}steps", "--"), ("-long", ":")):
                            r = res.get(f"rule110-t{t}-n{n}{suffix}-s{s}")
                            if not r:
                                continue
                            c = r["curve"]
                            label = f"N={n}, {r['run'].steps} steps" if s == SEEDS[0] else None
                            ax.plot([p[x_key] for p in c], [p[f"eval_{metric}"] for p in c], style, color=colors[n],
                                    marker="o", ms=3, label=label, alpha=0.9 if s == SEEDS[0] else 0.5)
                            if metric == "exact":
                                ax.axhline(c[-1]["eval_majority_exact"], color="k", ls="--", lw=0.8)
                title = f"Rule 110, t={t}" + (" (dashed: majority baseline)" if metric == "exact" else "")
                ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
                pl.finish(ax, legend_size=8)
        finish(fig, None, out / fname)

    curves("step", "rule110_curves.png", "training step (every seed; fainter: seeds 1, 2)")
    curves("elapsed", "rule110_walltime.png", "training wall time, s (1 thread)")

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for t in RULE110_DEPTHS:
        means = [np.mean([res[k]["eval"][n]["exact"] for k in (f"rule110-t{t}-n{n}-s{s}" for s in SEEDS)
                          if k in res] or [np.nan]) for n in RULE110_PASSES]
        ax.plot(RULE110_PASSES, means, marker="o", label=f"t={t}")
    ax.set(xlabel="sleep passes N (trained and evaluated)", ylabel="exact accuracy (mean of seeds)",
           title="Rule 110: accuracy vs N at equal steps", xticks=RULE110_PASSES)
    finish(fig, ax, out / "rule110_acc_vs_n.png")

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for n in DEPO_PASSES:
        got = [res[k] for k in (f"depo-n{n}-s{s}" for s in SEEDS) if k in res]
        if got:
            ax.plot(DEPO_KS, [np.mean([g["eval"][n][f"acc_k{k}"] for g in got]) for k in DEPO_KS], marker="o",
                    color=colors[n], label=f"N={n}")
    ax.axhline(depo_chance(), color="k", ls="--", lw=0.8, label="chance")
    ax.set(xscale="log", xticks=DEPO_KS, xticklabels=[str(k) for k in DEPO_KS], xlabel="hops k",
           ylabel="accuracy (mean of seeds)", title="Depo (cycles of 5-7 nodes)")
    finish(fig, ax, out / "depo_per_k.png")
    return written


BEGIN, END = "<!-- BEGIN experiments.report -->", "<!-- END experiments.report -->"


def splice(path: Path, text: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace what stands between the `begin` and `end` marker lines of `path` by `text`."""
    doc = path.read_text()
    if doc.count(begin) != 1 or doc.count(end) != 1 or doc.index(begin) > doc.index(end):
        raise SystemExit(f"error: {path} needs one {begin!r} line followed by one {end!r} line")
    head, rest = doc.split(begin)
    path.write_text(head + begin + "\n\n" + text + "\n" + end + rest.split(end)[1])


def main(args=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n")[0])
    p.add_argument("--root", default=ROOT, help=f"the runs (default {ROOT})")
    p.add_argument("--tables", default=str(TABLES), help=f"tables.md and summary.json go here (default {TABLES})")
    p.add_argument("--plots", default=str(PLOTS), help=f"PNG plots go here (default {PLOTS})")
    p.add_argument("--into", help="also put the tables into this markdown file, between the lines "
                                  f"{BEGIN!r} and {END!r} (docs/RESULTS.md)")
    a = p.parse_args(args)
    res = load(a.root)
    if not res:
        print(f"error: no finished runs under {a.root}; run `python -m experiments.run` first", file=sys.stderr)
        return 1
    lines = rule110_tables(res) + long_tables(res)
    for t in RULE110_DEPTHS:
        lines += [f"### Rule 110, t = {t}: exact accuracy when evaluated at another N (mean of seeds)", ""]
        lines += cross_n_table(res, f"rule110-t{t}", RULE110_PASSES, "exact")
    lines += ceiling_table(1) + ceiling_table(2)
    lines += lr_table(res)
    lines += depo_tables(res)
    lines += ["### Depo: overall accuracy when evaluated at another N (mean of seeds)", ""]
    lines += cross_n_table(res, "depo", DEPO_PASSES, "acc")
    lines += ["### Commands", ""] + commands(res, a.root)
    text = "\n".join(lines) + "\n"
    print(text)
    tables = Path(a.tables)
    tables.mkdir(parents=True, exist_ok=True)
    (tables / "tables.md").write_text(text)
    summary = {name: {"command": command(r["run"].train_argv(a.root)), "wall_s": r["wall_s"], "curve": r["curve"],
                      "eval": list(r["eval"].values())} for name, r in res.items()}
    (tables / "summary.json").write_text(json.dumps(summary, indent=1))
    if a.into:
        splice(Path(a.into), text)
    for path in plots(res, Path(a.plots)):
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
