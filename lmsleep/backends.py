"""A backend's package, trainer and generate() under one namespace, for the CLI's commands.

What a backend is (name, package, devices, `auto`, the calls that differ between frameworks) lives
in one table, common/backends.py; this module only gathers the entry points a command calls.
"""

from __future__ import annotations

from types import SimpleNamespace

from common.backends import choices, require, resolve


def load_backend(name: str) -> SimpleNamespace:
    """Import backend `name` (or auto): its package, HybridLM / load / save, trainer and generate()."""
    b = require(name)
    pkg = b.module()
    return SimpleNamespace(
        name=b.name, entry=b, pkg=pkg, HybridLM=pkg.HybridLM, load=pkg.load, save=pkg.save,
        train=b.module("train"), generate=b.module("generate").generate,
        tokens=b.array, no_grad=b.no_grad,
    )


__all__ = ["load_backend", "resolve", "choices"]
