"""`lmsleep bench scan`: ssm_scan "ref" vs "chunk" vs "kernel", forward and forward+backward.

Inputs look like the mixer's: q, k l2-normalized per head, v standard normal, beta = sigmoid(normal),
g = log forget gate uniform in [-0.5, -0.001]. Forward runs without gradients; forward+backward
differentiates (o * do).sum() + (S * dS).sum() for random cotangents with respect to q, k, v, g, beta.
"kernel" is timed where it exists (CUDA with Triton + flash-linear-attention; Metal for MLX) and
listed as skipped, with the reason, elsewhere.
"""

from __future__ import annotations

import numpy as np

from lmsleep import plots
from lmsleep.bench import common as bc

RULES = ("delta", "hebbian")
IMPLS = ("ref", "chunk", "kernel")
MODES = ("fwd", "fwd+bwd")
SHAPE = dict(B=4, H=4, D=64)
FULL = dict(lengths=(256, 1024, 4096), warmup=1, repeats=5, budget_s=20.0)
QUICK = dict(lengths=(256, 1024), warmup=1, repeats=3, budget_s=3.0)
TARGET_SPEEDUP = {"torch": 20.0, "mlx": 10.0}  # chunk vs ref, forward+backward, at the longest T
# (backend, device) -> why "kernel" is not timed there (where it is missing and would not say so itself)
KERNEL_SKIPS = {("torch", "cpu"): "needs CUDA (Triton / flash-linear-attention); TRITON_INTERPRET on CPU is a test mode"}


def make_inputs(B: int, T: int, H: int, D: int, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 inputs and cotangents of one scan ({q, k, v, g, beta} + {do, dS})."""
    rng = np.random.default_rng(seed)

    def unit(x):
        return x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)

    f32 = np.float32
    return {
        "q": unit(rng.standard_normal((B, T, H, D))).astype(f32),
        "k": unit(rng.standard_normal((B, T, H, D))).astype(f32),
        "v": rng.standard_normal((B, T, H, D)).astype(f32),
        "g": -rng.uniform(0.001, 0.5, (B, T, H)).astype(f32),
        "beta": (1 / (1 + np.exp(-rng.standard_normal((B, T, H))))).astype(f32),
        "do": rng.standard_normal((B, T, H, D)).astype(f32),
        "dS": rng.standard_normal((B, H, D, D)).astype(f32),
    }


def scan_calls(rt: bc.Runtime, x: dict, rule: str, impl: str):
    """(forward, forward+backward) zero-argument callables for one rule and impl."""
    names = ("q", "k", "v", "g", "beta")
    args = {n: rt.array(x[n]) for n in names}
    do, dS = rt.array(x["do"]), rt.array(x["dS"])
    scan = rt.ops.ssm_scan

    def fwd():
        with rt.no_grad():
            return scan(**args, rule=rule, impl=impl)

    def loss(q, k, v, g, beta):
        o, S = scan(q, k, v, g, beta, rule=rule, impl=impl)
        return (o * do).sum() + (S * dS).sum()

    grad = rt.grad(loss)
    return fwd, lambda: grad(*(args[n] for n in names))


def run(backend: str = "auto", *, quick: bool = False, device: str = "auto", threads: int | None = None, lengths=None,
        rules=RULES, impls=IMPLS, B: int = SHAPE["B"], H: int = SHAPE["H"], D: int = SHAPE["D"],
        repeats: int | None = None, progress=None) -> dict:
    """Time every (rule, mode, T, impl); returns the benchmark document (rows, targets, skips)."""
    rt = bc.runtime(backend, device, threads)
    plan = dict(QUICK if quick else FULL)
    if lengths:
        plan["lengths"] = tuple(lengths)
    if repeats:
        plan["repeats"] = repeats
    rows, skipped = [], {}
    if "kernel" in impls and (rt.backend, rt.device) in KERNEL_SKIPS:
        skipped["kernel"] = KERNEL_SKIPS[rt.backend, rt.device]
    for rule in rules:
        for T in plan["lengths"]:
            x = make_inputs(B, T, H, D)
            for impl in impls:
                if impl in skipped:
                    continue
                calls = dict(zip(MODES, scan_calls(rt, x, rule, impl)))
                for mode, fn in calls.items():
                    try:
                        t = bc.measure(fn, rt.sync, warmup=plan["warmup"], repeats=plan["repeats"],
                                       min_repeats=min(3, plan["repeats"]), budget_s=plan["budget_s"])
                    except (RuntimeError, ValueError, ImportError) as e:  # kernel not available here
                        skipped[impl] = str(e).splitlines()[0]
                        break
                    rows.append({"rule": rule, "mode": mode, "T": T, "impl": impl, **t,
                                 "tokens_per_s": B * T / t["median_s"]})
                    if progress:
                        progress(f"scan {rule:7s} {mode:7s} T={T:<5d} {impl:6s} {t['median_s'] * 1e3:9.2f} ms")
    _add_speedups(rows)
    settings = {"B": B, "H": H, "Dk": D, "Dv": D, "lengths": list(plan["lengths"]), "rules": list(rules),
                "impls": list(impls), "warmup": plan["warmup"], "repeats": plan["repeats"],
                "budget_s_per_cell": plan["budget_s"], "chunk_size": 64}
    return bc.document("scan", rt, quick, settings, rows, _targets(rt.backend, rows), skipped=skipped)


def _add_speedups(rows: list[dict]) -> None:
    """speedup_vs_ref = ref's median / this impl's median, for the same rule, mode and T."""
    ref = {(r["rule"], r["mode"], r["T"]): r["median_s"] for r in rows if r["impl"] == "ref"}
    for r in rows:
        base = ref.get((r["rule"], r["mode"], r["T"]))
        r["speedup_vs_ref"] = base / r["median_s"] if base else None


def _targets(backend: str, rows: list[dict]) -> list[dict]:
    need = TARGET_SPEEDUP.get(backend)
    if need is None:
        return []
    out = []
    for r in rows:
        longest = max(x["T"] for x in rows if x["rule"] == r["rule"])
        if r["impl"] == "chunk" and r["mode"] == "fwd+bwd" and r["T"] == longest and r["speedup_vs_ref"]:
            out.append(bc.target(f"{backend} chunk vs ref, {r['rule']}, fwd+bwd, T={r['T']}",
                                 r["speedup_vs_ref"], need, at_most=False, unit="x"))
    return out


COLUMNS = [("rule", "rule", "s"), ("mode", "mode", "s"), ("T", "T", "d"), ("impl", "impl", "s"),
           ("median ms", "median_ms", ".2f"), ("p90 ms", "p90_ms", ".2f"), ("tokens/s", "tokens_per_s", ",.0f"),
           ("x ref", "speedup_vs_ref", ".1f")]


def table(doc: dict) -> str:
    rows = [{**r, "median_ms": r["median_s"] * 1e3, "p90_ms": r["p90_s"] * 1e3} for r in doc["rows"]]
    text = bc.format_table(rows, COLUMNS)
    for impl, why in doc.get("skipped", {}).items():
        text += f"\n{impl}: skipped ({why})"
    return text


def plot(doc: dict, path):
    plt = plots.pyplot()
    if plt is None:
        return None
    rules = doc["settings"]["rules"]
    fig, axes = plt.subplots(1, len(rules), figsize=(5.5 * len(rules), 4), squeeze=False)
    for ax, rule in zip(axes[0], rules):
        for impl in doc["settings"]["impls"]:
            for mode, style in (("fwd", "--"), ("fwd+bwd", "-")):
                pts = [(r["T"], r["tokens_per_s"]) for r in doc["rows"]
                       if r["rule"] == rule and r["impl"] == impl and r["mode"] == mode]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", label=f"{impl} {mode}")
        ax.set(xscale="log", yscale="log", xlabel="T", ylabel="tokens/s",
               title=f"ssm_scan {rule} ({doc['backend']}, {doc['machine']['device']})")
        plots.log_ticks(ax.xaxis, doc["settings"]["lengths"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return plots.save(fig, path)
