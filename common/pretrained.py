"""What a pretrained Llama-family checkpoint is, without any framework: the source of a retrofit (SPEC section 7).

`SourceArch` describes the source model (read from a Hugging Face config.json by `from_hf_config`, or from GGUF
metadata by convert/gguf.py); `rope_inv_freq` computes its rotary inverse frequencies exactly as transformers does
(float64 here; transformers computes the same formula in float32); `HF_TO_CANONICAL` is the weight-name table in the
torchtitan style with the reverse derived from it, and `hf_to_canonical` / `canonical_to_hf` map single names
through a layer-index map (source layer j -> block i, shifted by the SSM blocks inserted before it).

Supported: model_type llama, mistral (no sliding window: then it is llama), qwen2 (q/k/v biases), qwen3 (per-head
q/k RMSNorm). Everything else is refused with one ValueError line naming the config field.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

import numpy as np

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """Rotary scaling as transformers' rope_parameters define it (fields unused by a type stay None)."""

    type: str = "default"                             # "default" | "linear" | "llama3"
    factor: float | None = None                       # linear and llama3
    low_freq_factor: float | None = None              # llama3
    high_freq_factor: float | None = None             # llama3
    original_max_position_embeddings: int | None = None  # llama3


@dataclass(frozen=True)
class SourceArch:
    """A Llama-family decoder as its checkpoint describes it (the fields a retrofit maps onto ModelConfig)."""

    model_type: str                  # "llama" | "mistral" | "qwen2" | "qwen3" (GGUF: "llama")
    vocab_size: int
    hidden_size: int                 # d_model
    n_layers: int
    n_heads: int                     # query heads
    n_kv_heads: int                  # key/value heads (GQA when < n_heads)
    head_dim: int                    # given by the config or hidden_size // n_heads
    intermediate_size: int           # SwiGLU MLP width
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    attn_bias: bool = False          # q/k/v projection biases (qwen2)
    qk_norm: bool = False            # per-head RMSNorm of q and k before rotary (qwen3)
    tie_embeddings: bool = False     # lm_head shares embed's weight (no lm_head tensor)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()  # a config may list several (Llama 3 instruct)
    max_position_embeddings: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"source config: {name}={value!r} must be a positive integer")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"source config: num_attention_heads={self.n_heads} is not a multiple of "
                             f"num_key_value_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"source config: head_dim={self.head_dim} must be even for rotary embeddings")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "SourceArch":
        d = dict(d)
        d["rope_scaling"] = RopeScaling(**d.get("rope_scaling", {}))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)


# ---------------------------------------------------------------- Hugging Face config.json -> SourceArch

def _refuse(field_name: str, value, why: str):
    raise ValueError(f"source config: {field_name}={value!r}: {why}")


def _int(cfg: Mapping, key: str, default=None) -> int:
    value = cfg.get(key, default)
    if value is None:
        raise ValueError(f"source config: {key} is missing")
    if not isinstance(value, int) or isinstance(value, bool):
        _refuse(key, value, "must be an integer")
    return value


def _rope(cfg: Mapping) -> tuple[float, RopeScaling]:
    """(rope_theta, scaling) from transformers 5's `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    params = cfg.get("rope_parameters")
    if params is not None:
        if not isinstance(params, Mapping) or "rope_theta" not in params and any(
                isinstance(v, Mapping) for v in params.values()):
            _refuse("rope_parameters", params, "per-layer-type rotary parameters are not supported")
        where = "rope_parameters"
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    else:
        params = cfg.get("rope_scaling") or {}
        where = "rope_scaling"
        if not isinstance(params, Mapping):
            _refuse("rope_scaling", params, "must be a mapping or null")
        theta = cfg.get("rope_theta", 10000.0)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ROPE_TYPES:
        _refuse(f"{where}.rope_type", kind, f"unknown rotary type (supported: {', '.join(ROPE_TYPES)})")
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        _refuse("partial_rotary_factor", partial, "only full-width rotary is supported")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        _refuse("rope_theta", theta, "must be a positive number")
    if kind == "default":
        return float(theta), RopeScaling()
    factor = params.get("factor")
    if not isinstance(factor, (int, float)) or factor <= 0:
        _refuse(f"{where}.factor", factor, f"a positive number is needed for rotary type {kind!r}")
    if kind == "linear":
        return float(theta), RopeScaling("linear", factor=float(factor))
    low, high = params.get("low_freq_factor"), params.get("high_freq_factor")
    original = params.get("original_max_position_embeddings", cfg.get("max_position_embeddings"))
    for key, value in (("low_freq_factor", low), ("high_freq_factor", high), ("original_max_position_embeddings",
                                                                              original)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            _refuse(f"{where}.{key}", value, "a positive number is needed for rotary type 'llama3'")
    if high == low:
        _refuse(f"{where}.high_freq_factor", high, "must differ from low_freq_factor")
    return float(theta), RopeScaling("llama3", factor=float(factor), low_freq_factor=float(low),
                                     high_freq_factor=float(high), original_max_position_embeddings=int(original))


def _sliding_window_in_use(cfg: Mapping, model_type: str, n_layers: int) -> str | None:
    """The config field that turns on sliding-window attention, or None when every layer attends fully."""
    layer_types = cfg.get("layer_types")
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        return "layer_types"
    window = cfg.get("sliding_window")
    if window is None:
        return None
    if model_type in ("qwen2", "qwen3"):
        # Qwen configs carry a sliding_window that only counts with use_sliding_window=true, and then only from
        # layer max_window_layers on (transformers' Qwen2Config.layer_types rule).
        if cfg.get("use_sliding_window", False) and cfg.get("max_window_layers", n_layers) < n_layers:
            return "use_sliding_window"
        return None
    return "sliding_window"


def from_hf_config(cfg: Mapping) -> SourceArch:
    """The SourceArch of a Hugging Face config.json (transformers 4 or 5 spelling); one-line ValueError otherwise."""
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        _refuse("model_type", model_type, f"not a supported architecture (supported: {', '.join(MODEL_TYPES)})")
    if cfg.get("quantization_config") is not None:
        _refuse("quantization_config", cfg["quantization_config"].get("quant_method", "?")
                if isinstance(cfg["quantization_config"], Mapping) else cfg["quantization_config"],
                "quantized checkpoints are not loaded; use the unquantized weights")
    if cfg.get("mlp_bias", False):
        _refuse("mlp_bias", cfg["mlp_bias"], "MLP biases are not supported")
    # llama/mistral/qwen3 `attention_bias` puts a bias on q, k, v *and* o_proj; qwen2 always has q/k/v biases only
    if model_type != "qwen2" and cfg.get("attention_bias", False):
        _refuse("attention_bias", cfg["attention_bias"], "an o_proj bias is not supported")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        _refuse("hidden_act", act, "only SwiGLU (silu) MLPs are supported")
    if cfg.get("pretraining_tp", 1) not in (None, 1):
        _refuse("pretraining_tp", cfg["pretraining_tp"], "tensor-parallel pretraining splits are not supported")
    n_layers = _int(cfg, "num_hidden_layers")
    window = _sliding_window_in_use(cfg, model_type, n_layers)
    if window is not None:
        _refuse(window, cfg.get(window), "sliding-window attention is not supported")
    hidden, n_heads = _int(cfg, "hidden_size"), _int(cfg, "num_attention_heads")
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if hidden % n_heads:
            _refuse("hidden_size", hidden, f"not divisible by num_attention_heads={n_heads} and no head_dim given")
        head_dim = hidden // n_heads
    theta, scaling = _rope(cfg)
    eos = cfg.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    max_pos = cfg.get("max_position_embeddings")
    return SourceArch(
        model_type=model_type, vocab_size=_int(cfg, "vocab_size"), hidden_size=hidden, n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=_int(cfg, "num_key_value_heads", n_heads), head_dim=head_dim,
        intermediate_size=_int(cfg, "intermediate_size"), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta, rope_scaling=scaling, attn_bias=model_type == "qwen2", qk_norm=model_type == "qwen3",
        # absent means untied: the default of all four transformers config classes
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos, max_position_embeddings=max_pos)


# ---------------------------------------------------------------- rotary inverse frequencies

def rope_inv_freq(arch: SourceArch) -> np.ndarray:
    """float64 [head_dim // 2] inverse frequencies, the formulas of transformers' ROPE_INIT_FUNCTIONS.

    default: theta^(-2i/d); linear: that / factor; llama3: wavelengths longer than original_max / low_freq_factor
    are divided by factor, shorter than original_max / high_freq_factor are kept, and the band between is
    interpolated with smooth = (original_max / wavelen - low) / (high - low).
    """
    d = arch.head_dim
    inv_freq = 1.0 / arch.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float64) / d)
    s = arch.rope_scaling
    if s.type == "default":
        return inv_freq
    if s.type == "linear":
        return inv_freq / s.factor
    assert s.type == "llama3", s.type
    old = s.original_max_position_embeddings
    low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled)


# ---------------------------------------------------------------- weight names

# Hugging Face name -> canonical name (SPEC sections 5 and 7); "{}" is the layer index (source j -> block i).
HF_TO_CANONICAL = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.norm1.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.norm2.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.k_proj.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.v_proj.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.o_proj.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attn.q_proj.bias",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attn.k_proj.bias",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attn.v_proj.bias",
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attn.q_norm.weight",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attn.k_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.gate_proj.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.up_proj.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.down_proj.weight",
}
CANONICAL_TO_HF = {v: k for k, v in HF_TO_CANONICAL.items()}
# Present in some checkpoints, never needed: the rotary table is recomputed from the config.
HF_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq|model\.rotary_emb\.inv_freq")

_LAYER = re.compile(r"(?<=layers\.)(\d+)(?=\.)")


def _template(name: str) -> tuple[str, int | None]:
    m = _LAYER.search(name)
    if m is None:
        return name, None
    return name[:m.start()] + "{}" + name[m.end():], int(m.group())


def _layer_map_fn(layer_map) -> Callable[[int], int]:
    if layer_map is None:
        return lambda j: j
    if callable(layer_map):
        return layer_map
    return lambda j: layer_map[j]


def hf_to_canonical(name: str, layer_map: Mapping[int, int] | Callable[[int], int] | None = None) -> str | None:
    """Canonical name of a Hugging Face tensor (layer j -> layer_map[j]); None for a tensor that is dropped
    (rotary inv_freq); ValueError for an unknown name."""
    if HF_IGNORED.fullmatch(name):
        return None
    key, j = _template(name)
    if key not in HF_TO_CANONICAL:
        raise ValueError(f"unknown tensor {name!r} in the source checkpoint")
    return HF_TO_CANONICAL[key] if j is None else HF_TO_CANONICAL[key].format(_layer_map_fn(layer_map)(j))


def canonical_to_hf(name: str, layer_map: Mapping[int, int] | Callable[[int], int] | None = None) -> str:
    """Inverse of hf_to_canonical: block i -> source layer layer_map[i] (pass the inverse map)."""
    key, i = _template(name)
    if key not in CANONICAL_TO_HF:
        raise ValueError(f"canonical tensor {name!r} has no Hugging Face counterpart")
    return CANONICAL_TO_HF[key] if i is None else CANONICAL_TO_HF[key].format(_layer_map_fn(layer_map)(i))


def expected_hf_shapes(arch: SourceArch) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this architecture holds, Hugging Face names, [out, in] layouts."""
    d, hd, f = arch.hidden_size, arch.head_dim, arch.intermediate_size
    q, kv = arch.n_heads * hd, arch.n_kv_heads * hd
    shapes = {"model.embed_tokens.weight": (arch.vocab_size, d), "model.norm.weight": (d,)}
    if not arch.tie_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, d)
    for j in range(arch.n_layers):
        p = f"model.layers.{j}."
        shapes.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f),
        })
        if arch.attn_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if arch.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
    return shapes


def check_hf_tensors(arch: SourceArch, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """ValueError (one line) unless the tensors are exactly the ones the architecture needs, with their shapes.
    A tied checkpoint may still carry an lm_head.weight (some exporters write it): that one is tolerated."""
    expected = expected_hf_shapes(arch)
    names = {n for n in shapes if not HF_IGNORED.fullmatch(n)}
    if arch.tie_embeddings:
        names.discard("lm_head.weight")
    missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
    if missing:
        raise ValueError(f"source checkpoint lacks {len(missing)} tensor(s), first {missing[0]!r}")
    if extra:
        raise ValueError(f"source checkpoint has {len(extra)} unexpected tensor(s), first {extra[0]!r}")
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise ValueError(f"source tensor {name!r} has shape {tuple(shapes[name])}, the config implies {shape}")


__all__ = ["SourceArch", "RopeScaling", "from_hf_config", "rope_inv_freq", "HF_TO_CANONICAL", "CANONICAL_TO_HF",
           "hf_to_canonical", "canonical_to_hf", "expected_hf_shapes", "check_hf_tensors", "MODEL_TYPES"]
