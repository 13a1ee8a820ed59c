"""Configs for the model and the trainer: flat dataclasses, validated on construction.

`ModelConfig` holds every field of SPEC section 2; `TrainConfig` the optimizer and loop settings.
Both round-trip through JSON (`to_dict` / `from_dict`) and have named presets (`from_name`).
Every bad value raises ValueError naming the field and the value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass

SSM_RULES = ("delta", "hebbian")
EVICTIONS = ("hard", "sliding")
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16", "float16")
ROPE_TYPES = ("default", "linear", "llama3")  # rotary scaling, as transformers defines it
SCAN_IMPLS = ("auto", "ref", "chunk", "kernel")
FREEZE_MODES = ("none", "mlp", "base")  # what stays fixed when fine-tuning a model folder (docs/TRAINING.md)

# Limits on every size and count of a ModelConfig (docs/FORMAT.md "Limits"): generous for any model this
# project can run, but finite, so a config.json read from disk can never ask for 10^9 layers or passes.
LIMITS = {
    "vocab_size": 1 << 20,      # 1,048,576 tokens (the largest pretrained vocabularies are ~260k)
    "d_model": 1 << 16,         # 65,536
    "n_layers": 1024,
    "n_heads": 1024,
    "n_kv_heads": 1024,
    "ssm_heads": 1024,
    "head_dim": 4096,
    "ssm_head_dim": 4096,
    "ssm_value_dim": 4096,
    "mlp_hidden": 1 << 18,      # 262,144
    "conv_size": 64,
    "window": 1 << 20,          # tokens per window L
    "sleep_passes": 1024,       # N
    "rope_original_max_positions": 1 << 24,
}
MAX_SLEEP_PASSES = LIMITS["sleep_passes"]


class _Config:
    """Shared JSON plumbing for the flat config dataclasses (no registry, no framework)."""

    @classmethod
    def from_dict(cls, d: dict, strict: bool = True):
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__} must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown and strict:
            raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        kwargs = {k: _coerce(cls.__name__, k, v, hints[k]) for k, v in d.items() if k in names}
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str, strict: bool = True):
        return cls.from_dict(json.loads(text), strict=strict)

    def replace(self, **overrides):
        """A copy with some fields changed (validated, unknown names rejected)."""
        return type(self).from_dict({**self.to_dict(), **overrides})

    @classmethod
    def from_name(cls, name: str, **overrides):
        presets = cls._presets()
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(presets))}")
        return presets[name].replace(**overrides)


def _coerce(owner: str, name: str, value, hint):
    """Check a JSON value against a field's type hint; ints pass as floats, lists as tuples."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:60] + "..."
    bad = ValueError(f"{owner}.{name}: expected {getattr(hint, '__name__', hint)}, got {shown}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        return tuple(_coerce(owner, name, v, typing.get_args(hint)[0]) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        value = float(value)
    elif hint is str and not isinstance(value, str):
        raise bad
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, owner: str, name: str, value, why: str) -> None:
    if not ok:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:60] + f"... ({len(shown)} characters)"
        raise ValueError(f"{owner}.{name}={shown}: {why}")


@dataclass(frozen=True)
class ModelConfig(_Config):
    vocab_size: int = 256  # tokens in the vocabulary (the task's tokenizer decides)
    d_model: int = 256  # residual stream width
    n_layers: int = 4  # number of blocks
    pattern: str = "AS"  # A = attention block, S = SSM block; tiled to n_layers (n_layers letters = explicit list)
    n_heads: int = 4  # attention (query) heads
    head_dim: int = 64  # attention head size (even: rotary pairs)
    ssm_heads: int = 4  # SSM heads
    ssm_head_dim: int = 64  # SSM key size Dk
    ssm_value_dim: int | None = None  # SSM value size Dv; None = ssm_head_dim
    ssm_rule: str = "delta"  # "delta" (Gated DeltaNet) or "hebbian" (gated linear attention)
    conv_size: int = 4  # short causal depthwise conv on q, k, v; 0 disables it
    mlp_hidden: int = 1024  # SwiGLU hidden size
    norm_eps: float = 1e-6  # RMSNorm epsilon
    rope_theta: float = 10000.0  # rotary base
    tie_embeddings: bool = True  # LM head shares the embedding matrix
    window: int = 24  # L: tokens the attention sees before eviction
    eviction: str = "hard"  # "hard": cache cleared after sleep; "sliding": last L-1 kept
    sleep_passes: int = 1  # N: passes over a full window when it sleeps (1 = plain hybrid)
    sleep_layers: tuple[int, int] | None = None  # [start, end) of looped blocks; None = all
    # Pretrained (retrofit) attention, SPEC section 7; the defaults are the from-scratch model.
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); None = n_heads
    attn_bias: bool = False  # q/k/v projection biases (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm of q and k over head_dim before rotary (Qwen3)
    rope_type: str = "default"  # rotary scaling: "default", "linear" or "llama3" (transformers' formulas)
    rope_factor: float = 1.0  # linear / llama3: frequency divisor
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_positions: int = 8192  # llama3: original_max_position_embeddings
    ssm_mlp: bool = True  # SSM blocks carry an MLP; False: h = h + ssm(norm1(h)) only (retrofit inserts)
    bos_id: int | None = None  # beginning-of-sequence token of a pretrained tokenizer (None: none)
    eos_ids: tuple[int, ...] = ()  # tokens that end a generation / chat turn

    # Fields added after format_version 1: a memory file's fingerprint hashes them only where they
    # differ from these defaults, so memories written before they existed still load.
    LATER_FIELDS = ("n_kv_heads", "attn_bias", "qk_norm", "rope_type", "rope_factor", "rope_low_freq_factor",
                    "rope_high_freq_factor", "rope_original_max_positions", "ssm_mlp", "bos_id", "eos_ids")

    @classmethod
    def _presets(cls):
        return PRESETS

    def __post_init__(self):
        c = "ModelConfig"
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "ssm_heads",
                     "ssm_head_dim", "mlp_hidden", "window", "sleep_passes"):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 1, c, name, value, "must be an integer >= 1")
        for name, limit in LIMITS.items():  # every size and count is bounded (docs/FORMAT.md "Limits")
            value = getattr(self, name)
            _check(value is None or not _is_int(value) or value <= limit, c, name, value, f"must be <= {limit}")
        _check(self.vocab_size >= 2, c, "vocab_size", self.vocab_size, "must be >= 2")
        _check(isinstance(self.pattern, str) and 0 < len(self.pattern) <= LIMITS["n_layers"]
               and set(self.pattern) <= {"A", "S"}, c, "pattern", self.pattern,
               f"must be a non-empty string of 'A' and 'S' (at most {LIMITS['n_layers']} letters)")
        _check(self.head_dim % 2 == 0, c, "head_dim", self.head_dim, "must be even (rotary)")
        _check(self.ssm_value_dim is None or (_is_int(self.ssm_value_dim) and self.ssm_value_dim >= 1),
               c, "ssm_value_dim", self.ssm_value_dim, "must be None or an integer >= 1")
        _check(self.ssm_rule in SSM_RULES, c, "ssm_rule", self.ssm_rule, f"must be one of {SSM_RULES}")
        _check(self.eviction in EVICTIONS, c, "eviction", self.eviction, f"must be one of {EVICTIONS}")
        _check(_is_int(self.conv_size) and self.conv_size >= 0, c, "conv_size",
               self.conv_size, "must be an integer >= 0")
        for name in ("norm_eps", "rope_theta", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                   and value > 0, c, name, value, "must be a finite number > 0")
        _check(self.norm_eps < 1, c, "norm_eps", self.norm_eps, "must be < 1")
        _check(isinstance(self.tie_embeddings, bool), c, "tie_embeddings", self.tie_embeddings, "must be a bool")
        if self.sleep_layers is not None:
            ok = (isinstance(self.sleep_layers, (list, tuple)) and len(self.sleep_layers) == 2
                  and all(_is_int(x) for x in self.sleep_layers)
                  and 0 <= self.sleep_layers[0] < self.sleep_layers[1] <= self.n_layers)
            _check(ok, c, "sleep_layers", self.sleep_layers,
                   f"must be [start, end) with 0 <= start < end <= n_layers={self.n_layers}")
            object.__setattr__(self, "sleep_layers", tuple(self.sleep_layers))
        kv = self.n_kv_heads
        _check(kv is None or (_is_int(kv) and kv >= 1 and self.n_heads % kv == 0),
               c, "n_kv_heads", kv, f"must be None or an integer >= 1 dividing n_heads={self.n_heads}")
        _check(self.rope_type in ROPE_TYPES, c, "rope_type", self.rope_type, f"must be one of {ROPE_TYPES}")
        _check(self.rope_type != "llama3" or self.rope_high_freq_factor > self.rope_low_freq_factor, c,
               "rope_high_freq_factor", self.rope_high_freq_factor, "must exceed rope_low_freq_factor (llama3)")
        _check(_is_int(self.rope_original_max_positions) and self.rope_original_max_positions >= 1, c,
               "rope_original_max_positions", self.rope_original_max_positions, "must be an integer >= 1")
        _check(isinstance(self.eos_ids, (list, tuple)) and len(self.eos_ids) <= 1024, c, "eos_ids", self.eos_ids,
               "must be a list of at most 1024 token ids")
        for name, ids in (("bos_id", () if self.bos_id is None else (self.bos_id,)), ("eos_ids", self.eos_ids)):
            _check(all(_is_int(i) and 0 <= i < self.vocab_size for i in ids),
                   c, name, getattr(self, name), f"must be token ids in [0, vocab_size={self.vocab_size})")
        object.__setattr__(self, "eos_ids", tuple(self.eos_ids))

    # Derived values (not stored: a config has one source of truth).
    @property
    def layer_types(self) -> str:
        """'A'/'S' per block: the pattern tiled to n_layers."""
        reps = -(-self.n_layers // len(self.pattern))
        return (self.pattern * reps)[: self.n_layers]

    @property
    def ssm_v_dim(self) -> int:
        return self.ssm_value_dim or self.ssm_head_dim

    @property
    def loop_range(self) -> tuple[int, int]:
        """[start, end) of the blocks a sleep pass repeats."""
        return self.sleep_layers or (0, self.n_layers)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def has_mlp(self, kind: str) -> bool:
        """Whether a block of this kind ('A' or 'S') has the SwiGLU MLP (and norm2)."""
        return kind == "A" or self.ssm_mlp

    def rope_inv_freq(self) -> list[float]:
        """Rotary inverse frequencies [head_dim / 2] in float64, as transformers computes them.

        default: theta^(-2i/D); linear: that / factor; llama3: wavelengths above
        original_max / low_freq_factor are divided by factor, those below original_max /
        high_freq_factor kept, and the band between interpolated smoothly.
        """
        d = self.head_dim
        inv = [1.0 / self.rope_theta ** (i / d) for i in range(0, d, 2)]
        if self.rope_type == "linear":
            return [f / self.rope_factor for f in inv]
        if self.rope_type == "default":
            return inv
        old, lo, hi = self.rope_original_max_positions, self.rope_low_freq_factor, self.rope_high_freq_factor
        out = []
        for f in inv:
            wavelen = 2 * math.pi / f
            if wavelen < old / hi:
                out.append(f)
            elif wavelen > old / lo:
                out.append(f / self.rope_factor)
            else:
                smooth = (old / wavelen - lo) / (hi - lo)
                out.append((1 - smooth) * f / self.rope_factor + smooth * f)
        return out

    def fingerprint_dict(self) -> dict:
        """to_dict() without the LATER_FIELDS that hold their defaults (see LATER_FIELDS)."""
        d, defaults = self.to_dict(), ModelConfig().to_dict()
        return {k: v for k, v in d.items() if k not in self.LATER_FIELDS or v != defaults[k]}


@dataclass(frozen=True)
class TrainConfig(_Config):
    muon_lr: float = 2e-3  # Muon learning rate for block matrices (paper: 2e-3 synthetic)
    adamw_lr: float = 5e-5  # AdamW learning rate for embeddings, norms, gates, head
    weight_decay: float = 0.0  # decoupled weight decay (both optimizers)
    adam_betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    muon_momentum: float = 0.95  # Muon momentum
    warmup_steps: int = 100  # linear warmup steps
    schedule: str = "cosine"  # decay after warmup: cosine | linear | constant
    min_lr_ratio: float = 0.1  # final lr as a fraction of the peak
    batch_size: int = 64  # global batch (examples per optimizer step)
    grad_accum: int = 1  # micro-batches per step (batch_size must divide evenly)
    steps: int = 1000  # optimizer steps
    grad_clip: float = 1.0  # global grad-norm clip; 0 disables
    seed: int = 0  # init + data seed
    eval_interval: int = 100  # steps between evals; 0 disables
    eval_samples: int = 512  # examples per eval
    save_interval: int = 500  # steps between checkpoints; 0 = only at the end
    log_interval: int = 10  # steps between metric lines
    checkpoint_windows: bool = False  # recompute each window in backward (activation checkpointing)
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16 (states stay float32)
    scan_impl: str = "auto"  # ssm_scan impl used for training
    freeze: str = "none"  # fine-tuning (train(init=...)): "none" | "mlp" | "base" (only inserted SSM blocks learn)

    @classmethod
    def _presets(cls):
        return TRAIN_PRESETS

    def __post_init__(self):
        c = "TrainConfig"
        for name in ("muon_lr", "adamw_lr"):
            _check(getattr(self, name) > 0, c, name, getattr(self, name), "must be > 0")
        for name in ("weight_decay", "grad_clip", "warmup_steps", "eval_interval", "save_interval"):
            _check(getattr(self, name) >= 0, c, name, getattr(self, name), "must be >= 0")
        for name in ("batch_size", "grad_accum", "steps", "eval_samples", "log_interval"):
            _check(getattr(self, name) >= 1, c, name, getattr(self, name), "must be >= 1")
        _check(self.batch_size % self.grad_accum == 0, c, "grad_accum", self.grad_accum,
               f"must divide batch_size={self.batch_size}")
        _check(0.0 <= self.min_lr_ratio <= 1.0, c, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _check(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), c,
               "adam_betas", self.adam_betas, "must be two numbers in [0, 1)")
        _check(0 <= self.muon_momentum < 1, c, "muon_momentum", self.muon_momentum, "must be in [0, 1)")
        _check(self.schedule in SCHEDULES, c, "schedule", self.schedule, f"must be one of {SCHEDULES}")
        _check(self.dtype in DTYPES, c, "dtype", self.dtype, f"must be one of {DTYPES}")
        _check(self.scan_impl in SCAN_IMPLS, c, "scan_impl", self.scan_impl, f"must be one of {SCAN_IMPLS}")
        _check(self.freeze in FREEZE_MODES, c, "freeze", self.freeze, f"must be one of {FREEZE_MODES}")
        object.__setattr__(self, "adam_betas", tuple(self.adam_betas))


# Named presets. Vocabulary and window of the paper presets match their tasks (rule110: 3 symbols,
# window 24; depo: window 75); the trainer adopts the task's values when they differ from a preset
# default and refuses explicit overrides that contradict the task.
PRESETS: dict[str, ModelConfig] = {
    # Tiny: for tests and smoke runs (a few ms per step).
    "debug": ModelConfig(vocab_size=16, d_model=32, n_layers=2, pattern="AS", n_heads=2, head_dim=16,
                         ssm_heads=2, ssm_head_dim=16, conv_size=4, mlp_hidden=64, window=8,
                         sleep_passes=2),
    # Laptop scale of the Rule 110 model: width 64 (PAPER.md "observed at laptop scale").
    "small-rule110": ModelConfig(vocab_size=3, d_model=64, n_layers=4, pattern="AS", n_heads=4,
                                 head_dim=16, ssm_heads=4, ssm_head_dim=16, mlp_hidden=256, window=24),
    # Paper, Rule 110: 4 layers A,S,A,S, width 256, L = 24.
    "paper-rule110": ModelConfig(vocab_size=3, d_model=256, n_layers=4, pattern="AS", n_heads=4,
                                 head_dim=64, ssm_heads=4, ssm_head_dim=64, mlp_hidden=1024, window=24),
    # Paper, Depo: 10-layer hybrid, width 512, L = 75.
    "paper-depo": ModelConfig(vocab_size=256, d_model=512, n_layers=10, pattern="AS", n_heads=8,
                              head_dim=64, ssm_heads=8, ssm_head_dim=64, mlp_hidden=2048, window=75),
}

TRAIN_PRESETS: dict[str, TrainConfig] = {
    "debug": TrainConfig(muon_lr=1e-2, adamw_lr=1e-3, warmup_steps=10, batch_size=8, steps=50,
                         eval_interval=25, eval_samples=64, save_interval=0, log_interval=5),
    "small-rule110": TrainConfig(muon_lr=1e-2, adamw_lr=1e-3, warmup_steps=50, batch_size=64,
                                 steps=1000, eval_interval=100, eval_samples=512),
    "paper-rule110": TrainConfig(muon_lr=2e-3, adamw_lr=5e-5, batch_size=512, steps=10000),
    "paper-depo": TrainConfig(muon_lr=2e-3, adamw_lr=5e-5, batch_size=128, steps=10000),
    # Fine-tuning a retrofitted folder (`lmsleep train --init DIR`; PAPER.md: Muon 1e-3 + AdamW 5e-5): only the
    # inserted SSM blocks learn, each window is recomputed in backward (a pretrained model's activations over
    # several windows and N passes do not fit otherwise), a small batch accumulated from micro-batches of 2,
    # bf16 compute (autocast on CUDA; float32 masters and optimizer state).
    "retrofit": TrainConfig(muon_lr=1e-3, adamw_lr=5e-5, warmup_steps=20, batch_size=8, grad_accum=4, steps=500,
                            grad_clip=1.0, eval_interval=100, eval_samples=64, save_interval=100, log_interval=1,
                            checkpoint_windows=True, dtype="bfloat16", freeze="base"),
}


def parse_override(text: str) -> tuple[str, object]:
    """'key=value' -> (key, value); the value is read as JSON when it parses, else as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"bad override {text!r}: expected key=value")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def split_overrides(overrides: dict) -> tuple[dict, dict]:
    """Route flat overrides to (model, train) by field name; unknown names raise ValueError."""
    model_names = {f.name for f in dataclasses.fields(ModelConfig)}
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    model, train = {}, {}
    for key, value in overrides.items():
        if key in model_names:
            model[key] = value
        elif key in train_names:
            train[key] = value
        else:
            raise ValueError(f"unknown config field {key!r} (not in ModelConfig or TrainConfig)")
    return model, train


__all__ = ["ModelConfig", "TrainConfig", "FREEZE_MODES", "LIMITS", "MAX_SLEEP_PASSES", "PRESETS", "TRAIN_PRESETS", "parse_override",
           "split_overrides"]
