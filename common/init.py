"""Initial weights, drawn once with numpy so that both backends start from identical numbers.

`init_params(config, seed)` returns {canonical name: float32 array} in the layout of SPEC section 5
(linear [out, in], conv [channels, kernel]). Each backend copies these into its modules, so a torch
model and an MLX model built with the same seed compute the same function before any training.
"""

from __future__ import annotations

import math

import numpy as np

from common.checkpoint import param_shapes
from common.config import ModelConfig

INIT_STD = 0.02  # std of every projection and the embedding (GPT-2 style)


def init_params(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out_std = INIT_STD / math.sqrt(2 * config.n_layers)  # residual-branch outputs, scaled by depth
    params = {}
    for name, shape in param_shapes(config).items():  # fixed order -> deterministic draws
        leaf = name.rsplit(".", 2)[-2] if name.endswith(".weight") else name.rsplit(".", 1)[-1]
        if "norm" in leaf:
            value = np.ones(shape, np.float32)
        elif leaf == "A_log":  # forget-gate rate A ~ U[1, 16] (Mamba-2 / GDN practice)
            value = np.log(rng.uniform(1.0, 16.0, shape)).astype(np.float32)
        elif leaf == "dt_bias":  # softplus(dt_bias) = dt ~ log-uniform [1e-3, 1e-1]
            dt = np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), shape))
            value = (dt + np.log(-np.expm1(-dt))).astype(np.float32)  # inverse softplus
        elif leaf.endswith("_conv"):  # depthwise conv: fan-in = kernel size
            bound = 1.0 / math.sqrt(shape[1])
            value = rng.uniform(-bound, bound, shape).astype(np.float32)
        else:
            std = out_std if leaf in ("o_proj", "down_proj") else INIT_STD
            value = (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)
        params[name] = value
    return params
