"""PyTorch backend of lm-sleep: `from sleep_torch import HybridLM, load, save`."""

from sleep_torch.io import load, save
from sleep_torch.model import HybridLM, State

__all__ = ["HybridLM", "State", "load", "save"]
