"""What every benchmark shares: the runtime, timing, machine info, memory probes, tables, output.

Timing is the median of repeats after warm-up calls; every timed call ends in the backend's `sync`
(common/backends.py): torch on CPU is synchronous, on CUDA it waits for `torch.cuda.synchronize()`;
MLX is lazy, so `mx.eval` of the results. Frameworks are imported lazily (`lmsleep --help` stays instant).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.metadata
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import numpy as np

from common import backends
from common.backends import Backend
from lmsleep import plots

RESULTS_DIR = Path("benchmarks") / "results"  # default output folder (relative to the working directory)
# matmul_peak's matrix size per (backend, device): MLX's Linux CPU matmul is ~100x slower than torch's
MATMUL_N = {("torch", "cpu"): 2048, ("torch", "cuda"): 8192, ("mlx", "cpu"): 1024, ("mlx", "gpu"): 4096}


# --- runtime: backend + device ------------------------------------------------------------------------

@dataclasses.dataclass
class Runtime:
    """A backend (its entry in common/backends.py) on one device, with its package and ops module."""

    entry: Backend
    device: str  # one of entry.devices: torch "cpu" | "cuda"; mlx "cpu" | "gpu"
    pkg: object  # sleep_torch | sleep_mlx
    ops: object  # sleep_torch.ops | sleep_mlx.ops

    @property
    def backend(self) -> str:
        return self.entry.name

    def array(self, x: np.ndarray, dtype=None):
        """A numpy array on this runtime's device (integers become token ids)."""
        return self.entry.array(x, self.device, dtype)

    def sync(self, result=None) -> None:
        """Wait until `result` (any nesting of arrays) has really been computed."""
        self.entry.sync(result, self.device)

    def no_grad(self):
        return self.entry.no_grad()

    def grad(self, fn):
        """fn(*arrays) -> scalar  =>  a function returning the gradient for each array."""
        return self.entry.grad(fn)

    def model(self, config, seed: int = 0):
        """HybridLM(config) on this device, float32."""
        return self.entry.to_device(self.pkg.HybridLM(config, seed=seed), self.device)


def runtime(backend: str = "auto", device: str = "auto", threads: int | None = None) -> Runtime:
    """Import the backend and pick its device: auto = CUDA when torch sees one, MLX's default device.

    threads: torch's intra-op threads (None: torch's default, one per core). With another busy process
    on a 2-core machine, 2 threads wait on each other at every op; 1 thread degrades gracefully."""
    b = backends.require(backend)
    if device == "auto":
        device = b.default_device()
    if device not in b.devices:
        raise ValueError(f"--device {device!r}: the {b.name} backend runs on {' or '.join(map(repr, b.devices))}")
    problem = b.device_problem(device)
    if problem:
        raise ValueError(f"--device {device}: {problem}")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        b.set_threads(threads)
    b.use_device(device)
    return Runtime(b, device, b.module(), b.module("ops"))


# --- timing ---------------------------------------------------------------------------------------------

def summarize(times: list[float]) -> dict:
    """Median, p90 (linear interpolation), min and mean of a list of seconds."""
    return {"median_s": statistics.median(times), "p90_s": float(np.percentile(times, 90)),
            "min_s": min(times), "mean_s": statistics.fmean(times), "repeats": len(times)}


def measure(fn, sync, *, setup=None, warmup: int = 1, repeats: int = 5, min_repeats: int = 3,
            budget_s: float | None = None) -> dict:
    """Time fn(*setup()) (setup untimed) after `warmup` calls: summarize() of up to `repeats` runs.

    After `min_repeats` runs, stops early once the timed runs have used `budget_s` seconds, so one
    slow cell cannot take the whole benchmark. `sync(result)` must block until the work is done.
    """
    for _ in range(warmup):
        sync(fn(*(setup() if setup else ())))
    times, spent = [], 0.0
    while len(times) < repeats:
        args = setup() if setup else ()
        t0 = time.perf_counter()
        sync(fn(*args))
        times.append(time.perf_counter() - t0)
        spent += times[-1]
        if budget_s is not None and len(times) >= min_repeats and spent >= budget_s:
            break
    return summarize(times)


# --- machine and memory ----------------------------------------------------------------------------------

def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(rt: Runtime) -> dict:
    """Where and when the numbers were taken: platform, CPUs, versions, threads, dtype, date, load."""
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": backends.cpus_usable(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names else None,
        "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        **{b.framework: _version(b.framework) for b in backends.BACKENDS.values()},
        "backend": rt.backend,
        "device": rt.device,
        "dtype": "float32",
        "env_threads": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
    }
    info.update(rt.entry.describe(rt.device))
    return info


def rss_bytes() -> int:
    """Resident set size of this process now (/proc/self/statm; peak RSS where there is no /proc)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if platform.system() == "Darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def minor_faults() -> int:
    """Minor page faults of this process so far (first touches of freshly mapped memory)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def matmul_peak(rt: Runtime, n: int | None = None, repeats: int = 7) -> dict:
    """Measured float32 GFLOP/s of one big square matmul on this runtime (the 'peak' for MFU).

    n defaults to MATMUL_N for the backend and device (1024 for one not listed)."""
    n = n or MATMUL_N.get((rt.backend, rt.device), 1024)
    rng = np.random.default_rng(0)
    a, b = (rt.array(rng.standard_normal((n, n), dtype=np.float32)) for _ in range(2))
    t = measure(lambda: a @ b, rt.sync, warmup=2, repeats=repeats, min_repeats=2, budget_s=10)
    # the best run: a peak is what the machine can do (turbo clocks and neighbours move the median)
    return {"n": n, "gflops": 2 * n**3 / t["min_s"] / 1e9, "gflops_median": 2 * n**3 / t["median_s"] / 1e9}


# --- tables, targets, output -------------------------------------------------------------------------------

def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (header, key, format spec); a missing value prints as '-'."""
    cells = [[header for header, _, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(key) is None else format(r[key], spec)) for _, key, spec in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)


def target(name: str, measured: float, limit: float, *, at_most: bool = True, unit: str = "") -> dict:
    """One target: met or not, and the gap (measured / limit) when not."""
    met = measured <= limit if at_most else measured >= limit
    return {"name": name, "target": f"{'<=' if at_most else '>='} {limit:g}{unit}",
            "measured": round(measured, 4), "met": bool(met), "ratio_to_target": round(measured / limit, 3)}


def format_targets(targets: list[dict]) -> str:
    lines = []
    for t in targets:
        status = "MET" if t["met"] else "NOT MET"
        lines.append(f"  [{status}] {t['name']}: measured {t['measured']:g}, target {t['target']}")
    return "\n".join(lines)


def document(bench: str, rt: Runtime, quick: bool, settings: dict, rows: list[dict], targets: list[dict],
             **extra) -> dict:
    return {"bench": bench, "backend": rt.backend, "quick": quick, "machine": machine_info(rt),
            "settings": settings, "rows": rows, "targets": targets, **extra}


def default_json_path(bench: str, backend: str, quick: bool) -> Path:
    return RESULTS_DIR / f"{bench}-{backend}{'-quick' if quick else ''}.json"


# the shared plot helpers under their old names here (bench/train.py's plot() still calls bc.pyplot / bc.save_figure)
pyplot, log_ticks, save_figure = plots.pyplot, plots.log_ticks, plots.save


def write_json(doc: dict, path) -> Path:
    from common.checkpoint import write_json as atomic_write_json

    atomic_write_json(path, doc)
    return Path(path)
