"""Affine group quantization of the block linear weights (MLX layout) and its exact numpy inverse.

MLX quantizes a weight W [out, in] in groups of `group_size` consecutive inputs of a row:
    scale = (max - min) / (2^bits - 1), bias = min,  q = round((w - bias) / scale)   (0 <= q < 2^bits)
    packed [out, in * bits / 32] uint32: element j of a word sits at bits [j*bits, (j+1)*bits)
    scales, biases [out, in / group_size] in the weight's float dtype;  w ~ scale * q + bias
`quantize_tensors` calls mx.quantize (so MLX's nn.quantize / QuantizedLinear read the result as is);
`dequantize` undoes it in numpy, bit for bit what mx.dequantize gives, so torch can use the weights.

Which layers: the attention, SSM and MLP projections of every block whose input size divides by
the group size, except a_proj / b_proj (a few output rows each; their error would go straight into
the forget and write gates). Embeddings, norms, short convs, A_log / dt_bias and lm_head stay as
they are. config.json lists the quantized layers: {"bits", "group_size", "layers": [...]}.
"""

from __future__ import annotations

import os

import numpy as np

from common import checkpoint as ckpt
from common.backends import require
from common.config import ModelConfig
from convert.dtypes import Raw, bf16_bits_to_f32, f32_to_bf16_bits, from_numpy, to_numpy

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
SKIP = ("a_proj", "b_proj")  # tiny gate projections: kept in float


def check_settings(bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise ValueError(f"quantization bits must be one of {BITS}, got {bits!r}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"quantization group_size must be one of {GROUP_SIZES}, got {group_size!r}")


def quantizable_layers(config: ModelConfig, group_size: int) -> list[str]:
    """Layer paths (`layers.{i}.{attn,ssm,mlp}.{name}`) that quantize with this group size."""
    layers = []
    for name, shape in ckpt.param_shapes(config).items():
        if not (name.startswith("layers.") and name.endswith("_proj.weight")):
            continue
        base = name[: -len(".weight")]
        if base.rsplit(".", 1)[1] not in SKIP and shape[1] % group_size == 0:
            layers.append(base)
    return layers


def quantize_tensors(tensors: dict[str, Raw], layers: list[str], bits: int, group_size: int) -> dict[str, Raw]:
    """Replace each listed layer's `.weight` by packed uint32 plus `.scales` / `.biases` (via mx.quantize)."""
    import mlx.core as mx

    out = {}
    for name, t in tensors.items():
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        if base not in layers:
            out[name] = t
            continue
        wq, scales, biases = mx.quantize(_to_mlx(t), group_size=group_size, bits=bits)
        out[name] = from_numpy(np.array(wq), "U32")
        out[base + ".scales"] = _from_mlx(scales, t.dtype)
        out[base + ".biases"] = _from_mlx(biases, t.dtype)
    return out


def dequantize(wq: np.ndarray, scales: np.ndarray, biases: np.ndarray, *, bits: int, group_size: int,
               dtype: str = "F32") -> np.ndarray:
    """Packed uint32 [out, in*bits/32] + scales/biases [out, in/group_size] -> float32 array [out, in].

    `dtype` is the scales' stored dtype tag: like mx.dequantize, the product and the sum are each
    rounded to it (the result is float32 holding values of that dtype).
    """
    if 32 % bits:
        raise ValueError(f"dequantize supports bits 2, 4 and 8, got {bits}")
    per_word = 32 // bits
    wq = np.asarray(wq, dtype=np.uint32)
    rows = wq.shape[0]
    shifts = (np.arange(per_word, dtype=np.uint32) * bits)  # element j of a word: bits [j*bits, (j+1)*bits)
    q = (wq[..., None] >> shifts) & np.uint32((1 << bits) - 1)  # (out, in/per_word, per_word)
    q = q.reshape(rows, -1, group_size).astype(np.float32)  # (out, groups, group_size)
    scales = np.asarray(scales, dtype=np.float32)[..., None]
    biases = np.asarray(biases, dtype=np.float32)[..., None]
    return _round(_round(scales * q, dtype) + biases, dtype).reshape(rows, -1)


def dequantize_tensors(tensors: dict[str, Raw], quantization: dict) -> dict[str, Raw]:
    """The inverse of quantize_tensors: float `.weight` (the scales' dtype) instead of packed + scales/biases."""
    bits, group = quantization["bits"], quantization["group_size"]
    layers = set(quantization["layers"])
    out = {}
    for name, t in tensors.items():
        base = name.rsplit(".", 1)[0]
        if base not in layers:
            out[name] = t
        elif name.endswith(".weight"):
            scales = tensors[base + ".scales"]
            w = dequantize(to_numpy(t), to_numpy(scales), to_numpy(tensors[base + ".biases"]), bits=bits,
                           group_size=group, dtype=scales.dtype)
            out[name] = from_numpy(w, scales.dtype)  # exact: w already holds values of that dtype
    return out


def quantization_error(reference_dir: str | os.PathLike, quantized_dir: str | os.PathLike, *, tokens: int = 64,
                       batch: int = 2, seed: int = 0) -> dict:
    """Logits of the quantized model vs the unquantized one (MLX, float32 compute) on random tokens."""
    mlx = require("mlx")  # quantized folders run on MLX
    ref, quant = (mlx.module().load(d, dtype="float32") for d in (reference_dir, quantized_dir))
    ids = np.random.default_rng(seed).integers(0, ref.config.vocab_size, (batch, tokens))
    a = mlx.to_numpy(ref(mlx.array(ids))).astype(np.float64)
    b = mlx.to_numpy(quant(mlx.array(ids))).astype(np.float64)
    err = float(np.max(np.abs(a - b)))
    return {"max_abs": err, "max_rel": err / max(float(np.max(np.abs(a))), 1e-30),
            "greedy_agreement": float(np.mean(a.argmax(-1) == b.argmax(-1))), "tokens": batch * tokens}


def _round(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round float32 values to a float dtype tag (kept as float32)."""
    if dtype == "BF16":
        return bf16_bits_to_f32(f32_to_bf16_bits(x))
    if dtype == "F16":
        return x.astype(np.float16).astype(np.float32)
    return x


def _to_mlx(t: Raw):
    import mlx.core as mx

    if t.dtype == "BF16":  # keep the bits: numpy has no bfloat16
        bits = np.frombuffer(t.data, dtype="<u2").reshape(t.shape)
        return mx.array(bits).view(mx.bfloat16)
    return mx.array(to_numpy(t))


def _from_mlx(a, dtype: str) -> Raw:
    import mlx.core as mx

    if dtype == "BF16":
        return from_numpy(np.array(a.view(mx.uint16)), "BF16")
    return from_numpy(np.array(a), dtype)


__all__ = ["BITS", "GROUP_SIZES", "check_settings", "quantizable_layers", "quantize_tensors", "dequantize",
           "dequantize_tensors", "quantization_error"]
