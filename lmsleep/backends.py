"""Pick and import a backend lazily: `auto` = MLX on Apple Silicon (when installed), else PyTorch.

Both backends expose the same names (SPEC section 1), so the CLI talks to either through one
small namespace and never branches on the backend beyond array conversion.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import platform
import sys
from types import SimpleNamespace

BACKENDS = ("auto", "torch", "mlx")


def resolve(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    if name != "auto":
        return name
    apple = sys.platform == "darwin" and platform.machine() == "arm64"
    return "mlx" if apple and importlib.util.find_spec("mlx") else "torch"


def load_backend(name: str) -> SimpleNamespace:
    """The backend's package, trainer and generate() under one namespace."""
    name = resolve(name)
    package = f"sleep_{name}"
    if importlib.util.find_spec("torch" if name == "torch" else "mlx") is None:
        raise ValueError(f"backend {name!r} is not installed (pip install 'lm-sleep[{name}]')")
    pkg = importlib.import_module(package)
    return SimpleNamespace(
        name=name, pkg=pkg, HybridLM=pkg.HybridLM, load=pkg.load, save=pkg.save,
        train=importlib.import_module(f"{package}.train"),
        generate=importlib.import_module(f"{package}.generate").generate,
        tokens=_to_torch if name == "torch" else _to_mlx,
        no_grad=_torch_no_grad if name == "torch" else contextlib.nullcontext,
    )


def _torch_no_grad():
    import torch

    return torch.no_grad()


def _to_torch(array):
    import torch

    return torch.as_tensor(array, dtype=torch.long)


def _to_mlx(array):
    import mlx.core as mx

    return mx.array(array, dtype=mx.int32)
