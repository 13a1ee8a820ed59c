"""`lmsleep bench sleep`: the cost of one sleep vs the number of passes N and the window L.

Model: the decode benchmark's sleep model (small-rule110 preset, vocabulary 258, hard eviction,
float32, no gradients), batch 1 by default, built once per window L (the weights do not depend on L).
- prefill: `model.step(L random tokens, fresh state, passes=N)`, timed with the fresh state made
  outside the timer: one window's wake pass (embedding, every block, LM head) that leaves a sleep due.
- sleep: `model.sleep(state)` on a copy of that state (the copy is made outside the timer): the due
  sleep with N passes. Pass 1 is the wake pass, reused, so N passes cost N-1 block passes over the
  window and no LM head; N = 1 only commits the states and evicts the cache.
Targets: sleep time linear in N (least-squares line sleep = a + b (N-1), with R^2 and the largest
residual), and sleep(N) <= 1.1 x (N-1) x prefill for every N >= 2 (window L and N of the same row).
"""

from __future__ import annotations

import copy

import numpy as np

from lmsleep import plots
from lmsleep.bench import common as bc
from lmsleep.bench.decode import model_configs

FULL = dict(passes=(1, 2, 3, 4, 5, 6, 7, 8), windows=(64, 128, 256), window_passes=4, warmup=2, repeats=15,
            budget_s=5.0)
QUICK = dict(passes=(1, 2, 4, 8), windows=(64, 128), window_passes=4, warmup=2, repeats=7, budget_s=1.5)
PREFILL_RATIO = 1.1  # target: sleep(N) <= 1.1 x (N-1) x one window's prefill
LINEAR_R2 = 0.99  # "linear in N": R^2 of the least-squares line at least this


def time_window(rt: bc.Runtime, model, passes: int, batch: int, plan: dict, seed: int = 0) -> dict:
    """Median prefill and sleep times (seconds) for one model (window L) and N."""
    L = model.config.window
    tokens = rt.array(np.random.default_rng(seed).integers(0, model.config.vocab_size, (batch, L)))

    def prefill(state):
        logits, state = model.step(tokens, state, passes=passes)
        return logits

    def sleep(state):
        model.sleep(state)
        return state.tensors()

    with rt.no_grad():
        due = model.new_state(batch)
        rt.sync(model.step(tokens, due, passes=passes)[0])
        assert due.due == passes
        kw = dict(warmup=plan["warmup"], repeats=plan["repeats"], min_repeats=3, budget_s=plan["budget_s"])
        p = bc.measure(prefill, rt.sync, setup=lambda: (model.new_state(batch),), **kw)
        s = bc.measure(sleep, rt.sync, setup=lambda: (copy.copy(due),), **kw)
    row = {"window": L, "passes": passes, "batch": batch, "prefill_ms": p["median_s"] * 1e3,
           "prefill_p90_ms": p["p90_s"] * 1e3, "sleep_ms": s["median_s"] * 1e3, "sleep_p90_ms": s["p90_s"] * 1e3}
    row["sleep_per_extra_pass_ms"] = row["sleep_ms"] / (passes - 1) if passes > 1 else None
    row["sleep_vs_prefill"] = row["sleep_ms"] / ((passes - 1) * row["prefill_ms"]) if passes > 1 else None
    return row


def run(backend: str = "auto", *, quick: bool = False, device: str = "auto", threads: int | None = None,
        passes=None, windows=None, batch: int = 1, preset: str = "small-rule110", vocab_size: int = 258,
        progress=None) -> dict:
    rt = bc.runtime(backend, device, threads)
    plan = dict(QUICK if quick else FULL)
    passes = tuple(passes or plan["passes"])
    windows = tuple(windows or plan["windows"])
    base_L = windows[0]
    models = {L: rt.model(model_configs(preset, vocab_size=vocab_size, window=L)[0]) for L in windows}
    rows = []
    for N in passes:  # vs N at the first window
        rows.append({"sweep": "passes", **time_window(rt, models[base_L], N, batch, plan)})
        _report(progress, rows[-1])
    for L in windows:  # vs L at a fixed N
        rows.append({"sweep": "window", **time_window(rt, models[L], plan["window_passes"], batch, plan)})
        _report(progress, rows[-1])
    fit = linear_fit([r["passes"] - 1 for r in rows if r["sweep"] == "passes"],
                     [r["sleep_ms"] for r in rows if r["sweep"] == "passes"])
    settings = {"model": models[base_L].config.to_dict(), "preset": preset, "batch": batch, "passes": list(passes),
                "windows": list(windows), "window_sweep_passes": plan["window_passes"], "warmup": plan["warmup"],
                "repeats": plan["repeats"]}
    return bc.document("sleep", rt, quick, settings, rows, _targets(rows, fit), fit=fit)


def _report(progress, r: dict) -> None:
    if progress:
        progress(f"sleep L={r['window']:<4d} N={r['passes']}: sleep {r['sleep_ms']:.2f} ms, "
                 f"prefill {r['prefill_ms']:.2f} ms")


def linear_fit(xs, ys) -> dict:
    """Least-squares y = a + b x: intercept, slope, R^2, largest |residual| (ms and relative to mean y)."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    if len(x) < 2:
        return {"intercept_ms": None, "slope_ms": None, "r2": None, "max_residual_ms": None,
                "max_residual_rel": None}
    b, a = np.polyfit(x, y, 1)
    resid = np.abs(y - (a + b * x))
    ss = float(((y - y.mean()) ** 2).sum())
    return {"intercept_ms": float(a), "slope_ms": float(b),
            "r2": 1 - float((resid**2).sum()) / ss if ss > 0 else 1.0,
            "max_residual_ms": float(resid.max()), "max_residual_rel": float(resid.max() / y.mean())}


def _targets(rows: list[dict], fit: dict) -> list[dict]:
    out = []
    if fit["r2"] is not None:
        out.append(bc.target("sleep time linear in N (R^2 of the line sleep_ms = a + b (N-1))", fit["r2"],
                             LINEAR_R2, at_most=False))
    ratios = [r for r in rows if r["sleep_vs_prefill"] is not None]
    if ratios:
        worst = max(ratios, key=lambda r: r["sleep_vs_prefill"])
        out.append(bc.target(f"sleep(N) / ((N-1) x prefill), worst row (L={worst['window']}, N={worst['passes']})",
                             worst["sleep_vs_prefill"], PREFILL_RATIO))
    return out


COLUMNS = [("sweep", "sweep", "s"), ("L", "window", "d"), ("N", "passes", "d"), ("batch", "batch", "d"),
           ("prefill ms", "prefill_ms", ".3f"), ("sleep ms", "sleep_ms", ".3f"),
           ("sleep p90 ms", "sleep_p90_ms", ".3f"),
           ("ms / extra pass", "sleep_per_extra_pass_ms", ".3f"), ("sleep/((N-1) prefill)", "sleep_vs_prefill", ".2f")]


def table(doc: dict) -> str:
    f = doc["fit"]
    text = bc.format_table(doc["rows"], COLUMNS)
    if f["r2"] is not None:
        text += (f"\nfit over N (L={doc['settings']['windows'][0]}): sleep_ms = {f['intercept_ms']:.3f} + "
                 f"{f['slope_ms']:.3f} (N-1), R^2 {f['r2']:.4f}, largest residual {f['max_residual_ms']:.3f} ms "
                 f"({f['max_residual_rel']:.1%} of the mean)")
    return text


def plot(doc: dict, path):
    plt = plots.pyplot()
    if plt is None:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    rows = [r for r in doc["rows"] if r["sweep"] == "passes"]
    ns = [r["passes"] for r in rows]
    ax1.plot(ns, [r["sleep_ms"] for r in rows], marker="o", label="sleep")
    ax1.plot(ns, [(n - 1) * r["prefill_ms"] for n, r in zip(ns, rows)], "--", label="(N-1) x prefill")
    ax1.set(xlabel="passes N", ylabel="ms", title=f"one sleep vs N (L={rows[0]['window']}, {doc['backend']})")
    by_L = [r for r in doc["rows"] if r["sweep"] == "window"]
    ax2.plot([r["window"] for r in by_L], [r["sleep_ms"] for r in by_L], marker="o", label="sleep")
    ax2.plot([r["window"] for r in by_L], [r["prefill_ms"] for r in by_L], marker="s", label="prefill")
    ax2.set(xlabel="window L", ylabel="ms", title=f"vs L (N={doc['settings']['window_sweep_passes']})")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return plots.save(fig, path)
