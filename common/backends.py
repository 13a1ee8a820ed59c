"""The backends in one table: name, package, how to tell it is installed, devices, the calls that differ.

Every caller that needs a backend (the CLI's `--backend` choices, `lmsleep.backends`, the benchmarks,
convert's parity check) looks it up here and calls what the entry holds; none branches on the name.

    b = require("auto")                      # MLX on Apple Silicon when installed, else torch
    model = b.module().load("runs/r110/model")   # sleep_torch | sleep_mlx: HybridLM, State, load, save
    b.module("train").train(...)             # .train, .generate, .ops: the mirrored modules
    with b.no_grad():
        logits = model(b.array(ids))         # numpy token ids -> the framework's integer array

The table is framework-free: an entry names its package and framework as strings (imported with
importlib on use; installed = importlib.util.find_spec), and its framework calls are the small
functions below, each importing torch or mlx only when it is called. Importing this module (and so
`lmsleep --help`) never imports either framework.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import os
import platform
import sys
from typing import Any, Callable, ContextManager

AUTO = "auto"
DEFAULT = "torch"  # what `auto` picks when no installed backend prefers this machine


@dataclasses.dataclass(frozen=True)
class Backend:
    """One backend: where it lives, where it runs, and the few framework calls callers need."""

    name: str  # the --backend value, and "backend" in safetensors metadata
    package: str  # HybridLM, State, load, save; submodules ops, train, generate (the mirror)
    framework: str  # the module (and distribution) whose presence means "installed"
    extra: str  # pip extra that installs it: pip install 'lm-sleep[extra]'
    devices: tuple[str, ...]  # the --device values it accepts
    distributed: bool  # trains over several processes (`lmsleep train --nproc`)
    preferred: Callable[[], bool]  # `auto` picks this backend (when installed) where this holds
    # framework calls: each imports the framework when called
    default_device: Callable[[], str]  # what --device auto means here
    device_problem: Callable[[str], str | None]  # why a listed device cannot run here, or None
    use_device: Callable[[str], None]  # make device the default (MLX); torch places arrays explicitly
    set_threads: Callable[[int], None]  # intra-op CPU threads (no-op where the framework has no knob)
    array: Callable[..., Any]  # (numpy, device=None, dtype=None) -> array; integers become token ids
    to_numpy: Callable[[Any], Any]  # array -> numpy (bfloat16 widens to float32: numpy has none)
    no_grad: Callable[[], ContextManager]  # a context recording no gradients
    sync: Callable[[Any, str], None]  # (result, device): block until result is really computed
    grad: Callable[[Callable], Callable]  # f(*arrays) -> scalar  =>  g(*arrays) -> gradient per array
    to_device: Callable[[Any, str], Any]  # (model, device) -> the model on device
    describe: Callable[[str], dict]  # framework facts for a benchmark's machine record

    @property
    def installed(self) -> bool:
        return importlib.util.find_spec(self.framework) is not None

    def module(self, sub: str = ""):
        """The backend package, or one of its modules: module("train"), module("ops")."""
        return importlib.import_module(f"{self.package}.{sub}" if sub else self.package)


# --- looking backends up -----------------------------------------------------------------------------

def names() -> tuple[str, ...]:
    """Backend names in table order (read at call time: the CLI's choices follow the table)."""
    return tuple(BACKENDS)


def choices() -> tuple[str, ...]:
    """What --backend accepts: auto and every backend."""
    return (AUTO, *names())


def resolve(name: str) -> str:
    """A backend name, with `auto` = the first installed backend that prefers this machine, else torch."""
    if name == AUTO:
        return next((b.name for b in BACKENDS.values() if b.preferred() and b.installed), DEFAULT)
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} (choose from {', '.join(choices())})")
    return name


def get(name: str) -> Backend:
    """The table entry of a backend (auto resolved), installed or not."""
    return BACKENDS[resolve(name)]


def require(name: str) -> Backend:
    """The table entry of an installed backend; a one-line ValueError says how to install it."""
    b = get(name)
    if not b.installed:
        raise ValueError(f"backend {b.name!r} is not installed (pip install 'lm-sleep[{b.extra}]')")
    return b


def apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def _never() -> bool:
    return False


# --- CPU threads on a shared machine ---------------------------------------------------------------------

def cpus_usable() -> int:
    """CPUs this process may run on: its affinity mask (taskset, cgroup cpusets), else os.cpu_count()."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_thread_policy(environ=os.environ) -> dict[str, str]:
    """The CLI's default OpenMP threads; call it before torch is first imported (OpenMP reads them once).

    Unless the user set OMP_NUM_THREADS: one thread when the affinity mask holds 2 CPUs or fewer (more
    CPUs: OpenMP's default, one per CPU of the mask). On a 2-core machine sharing its CPUs with one other
    busy process, torch's 2 threads wait on each other at every op (a small-rule110 training step 0.57 s
    vs 0.20 s on 1 thread), while alone 2 threads gained little (0.12-0.19 s vs 0.17 s): docs/BENCHMARKS.md
    section 6. OMP_WAIT_POLICY is left alone: PASSIVE halved the shared-CPU loss but made the step 2.5x
    slower alone. Returns what it set; OMP_NUM_THREADS=2 (or `--threads 2` in the benchmarks) overrides."""
    if "OMP_NUM_THREADS" in environ or cpus_usable() > 2:
        return {}
    environ["OMP_NUM_THREADS"] = "1"
    return {"OMP_NUM_THREADS": "1"}


# --- torch ---------------------------------------------------------------------------------------------

def _torch_default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_device_problem(device: str) -> str | None:
    import torch

    return "torch sees no CUDA device" if device == "cuda" and not torch.cuda.is_available() else None


def _torch_use_device(device: str) -> None:
    """Nothing to set: torch moves each array and model to its device."""


def _torch_set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _torch_array(x, device: str | None = None, dtype=None):
    import numpy as np
    import torch

    a = np.ascontiguousarray(x)
    t = torch.from_numpy(a)
    if np.issubdtype(a.dtype, np.integer):
        dtype = torch.long  # token ids: embedding lookups take int64
    return t.to(device or "cpu", dtype=dtype)


def _torch_to_numpy(x):
    import torch

    x = x.detach().cpu()
    return (x.float() if x.dtype == torch.bfloat16 else x).numpy()


def _torch_no_grad():
    import torch

    return torch.no_grad()


def _torch_sync(result, device: str) -> None:
    """CPU ops are synchronous; CUDA kernels are queued, so wait for them."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _torch_grad(fn: Callable) -> Callable:
    import torch

    def grad(*arrays):
        leaves = [a.detach().requires_grad_() for a in arrays]
        return torch.autograd.grad(fn(*leaves), leaves)

    return grad


def _torch_to_device(model, device: str):
    return model.to(device)


def _torch_describe(device: str) -> dict:
    import torch

    info = {"threads": torch.get_num_threads()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


# --- mlx -------------------------------------------------------------------------------------------------

def _mlx_default_device() -> str:
    import mlx.core as mx

    return "gpu" if mx.default_device() == mx.gpu else "cpu"


def _mlx_device_problem(device: str) -> str | None:
    import mlx.core as mx

    return "MLX has no GPU here (Metal is not available)" if device == "gpu" and not mx.metal.is_available() else None


def _mlx_use_device(device: str) -> None:
    import mlx.core as mx

    mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)


def _mlx_set_threads(n: int) -> None:
    """MLX has no intra-op thread setting: its CPU work uses what the machine offers."""


def _mlx_array(x, device: str | None = None, dtype=None):
    """device is the default device (use_device); MLX arrays carry none of their own."""
    import mlx.core as mx
    import numpy as np

    a = np.asarray(x)
    if np.issubdtype(a.dtype, np.integer):
        dtype = mx.int32  # token ids: what sleep_mlx's embeddings and generate use
    return mx.array(a) if dtype is None else mx.array(a, dtype=dtype)


def _mlx_to_numpy(x):
    import mlx.core as mx
    import numpy as np

    return np.array(x.astype(mx.float32) if x.dtype == mx.bfloat16 else x)


def _mlx_sync(result, device: str) -> None:
    """MLX is lazy: evaluating the result is what runs the work."""
    if result is not None:
        import mlx.core as mx

        mx.eval(result)


def _mlx_grad(fn: Callable) -> Callable:
    import mlx.core as mx

    def grad(*arrays):
        grads = mx.grad(fn, argnums=tuple(range(len(arrays))))(*arrays)
        return grads if isinstance(grads, tuple) else (grads,)  # one argument: MLX returns the bare array

    return grad


def _mlx_to_device(model, device: str):
    return model  # arrays live in unified memory; the default device decides where work runs


def _mlx_describe(device: str) -> dict:
    import mlx.core as mx

    return {"mlx_device": str(mx.default_device()), "metal": bool(mx.metal.is_available())}


# --- the table ---------------------------------------------------------------------------------------------

BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend(name="torch", package="sleep_torch", framework="torch", extra="torch", devices=("cpu", "cuda"),
            distributed=True, preferred=_never,
            default_device=_torch_default_device, device_problem=_torch_device_problem,
            use_device=_torch_use_device, set_threads=_torch_set_threads, array=_torch_array,
            to_numpy=_torch_to_numpy, no_grad=_torch_no_grad, sync=_torch_sync, grad=_torch_grad,
            to_device=_torch_to_device, describe=_torch_describe),
    Backend(name="mlx", package="sleep_mlx", framework="mlx", extra="mlx", devices=("cpu", "gpu"),
            distributed=False, preferred=apple_silicon,
            default_device=_mlx_default_device, device_problem=_mlx_device_problem,
            use_device=_mlx_use_device, set_threads=_mlx_set_threads, array=_mlx_array,
            to_numpy=_mlx_to_numpy, no_grad=contextlib.nullcontext, sync=_mlx_sync, grad=_mlx_grad,
            to_device=_mlx_to_device, describe=_mlx_describe),
)}

__all__ = ["AUTO", "DEFAULT", "Backend", "BACKENDS", "names", "choices", "resolve", "get", "require",
           "apple_silicon"]
