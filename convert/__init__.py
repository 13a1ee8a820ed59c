"""Checkpoint conversion between the backends, external imports, parity checks, hub transfer.

Backends are imported lazily inside functions: convert sits above both in the import tree.
"""
