"""MLX SSM scan vs mlx-lm's gated delta recurrence, side by side in one process (mlx[cpu]).

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.ssm_step [--rounds 5] [--lengths 256 1024]

Decode step (T = 1, B = 1, H = 4, D = 64): sleep_mlx.ops.ssm_scan with impl="auto" (the compiled step)
and impl="ref" (the loop the step replaced) against mlx_lm.models.gated_delta.gated_delta_ops, whose
T = 1 call is its mx.compile'd `_gated_delta_step_ops`. Prefill (T = lengths): our "chunk" form
against the same mlx-lm ops loop (its Metal kernel needs an Apple GPU). Each call ends in mx.eval;
the contenders alternate within every round, the table shows medians (us per call). mlx-lm takes
the forget gate as a factor a = exp(g) and q unscaled: both are prepared outside the timed call.
mlx-lm is a comparison only: imported here, and the script says so and stops when it is missing.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import statistics
import time

import numpy as np


def inputs(T: int, B: int = 1, H: int = 4, D: int = 64, seed: int = 0):
    import mlx.core as mx

    rng = np.random.default_rng(seed)

    def unit(x):
        return x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)

    f32 = np.float32
    q, k = (mx.array(unit(rng.standard_normal((B, T, H, D))).astype(f32)) for _ in range(2))
    v = mx.array(rng.standard_normal((B, T, H, D)).astype(f32))
    g = mx.array(-rng.uniform(0.001, 0.5, (B, T, H)).astype(f32))
    beta = mx.array(rng.uniform(0.0, 1.0, (B, T, H)).astype(f32))
    S = mx.zeros((B, H, D, D), dtype=mx.float32)
    mx.eval(q, k, v, g, beta, S)
    return q, k, v, g, beta, S


def timed(fn, calls: int) -> float:
    """Median microseconds per call of fn() (which evaluates its result)."""
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=200, help="decode steps per contender and round")
    ap.add_argument("--lengths", type=int, nargs="*", default=[256, 1024], help="prefill lengths")
    args = ap.parse_args()
    import mlx.core as mx

    from sleep_mlx import ops

    try:
        gd = importlib.import_module("mlx_lm.models.gated_delta")
    except ImportError:
        print("mlx-lm is not installed (pip install mlx-lm): nothing to compare against")
        return
    rows = []
    for T in [1, *args.lengths]:
        q, k, v, g, beta, S = inputs(T)
        a, q_scaled = mx.exp(g), q * q.shape[-1] ** -0.5
        mx.eval(a, q_scaled)
        impls = ("auto", "ref") if T == 1 else ("chunk",)
        contenders = {f"sleep_mlx ssm_scan {impl}": (lambda impl=impl: mx.eval(
            ops.ssm_scan(q, k, v, g, beta, rule="delta", initial_state=S, impl=impl))) for impl in impls}
        contenders["mlx-lm gated_delta_ops"] = lambda: mx.eval(gd.gated_delta_ops(q_scaled, k, v, a, beta, S))
        calls = args.calls if T == 1 else 3
        for fn in contenders.values():  # warm-up: mx.compile traces
            timed(fn, 3)
        times = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, fn in contenders.items():
                times[name].append(timed(fn, calls))
        rows += [(T, name, statistics.median(ts)) for name, ts in times.items()]
    print(f"mlx {mx.__version__} on {mx.default_device()}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} "
          f"UTC, B=1 H=4 D=64 delta, median of {args.rounds} alternating rounds, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| T | contender | us per call | tokens/s |")
    print("|--:|-----------|------------:|---------:|")
    for T, name, us in rows:
        print(f"| {T} | {name} | {us:.0f} | {T / us * 1e6:,.0f} |")


if __name__ == "__main__":
    main()
