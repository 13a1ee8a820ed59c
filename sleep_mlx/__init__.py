"""MLX backend of lm-sleep: `from sleep_mlx import HybridLM, load, save`."""

from sleep_mlx.io import load, save
from sleep_mlx.model import HybridLM, State

__all__ = ["HybridLM", "State", "load", "save"]
