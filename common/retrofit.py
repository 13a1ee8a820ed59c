"""Retrofit: what a pretrained Llama-family decoder becomes as a sleeping hybrid (SPEC section 7).

Framework-free: from a source architecture (common.pretrained.SourceArch) and the user's choices,
`plan` decides the block list (source attention layers in order, MLP-free SSM blocks inserted
between them), the looped range, the ModelConfig and the `retrofit` record of config.json;
`inserted_params` draws the inserted blocks' weights so that they start as exact no-ops
(`ssm.o_proj` = 0). convert/retrofit.py reads the source weights and writes the folder.

Conventions (docs/RETROFIT.md):
- `insert_at` = source layer indices j: one SSM block goes in front of source layer j (it reads
  what layers 0..j-1 wrote); j == n_layers puts one after the last layer.
- `loop` = [a, b) in source layer indices; the looped block range runs from the first block of
  source layer a (an SSM block inserted in front of a included) to the last block before source
  layer b's. "all" loops every block (Ouro-style); the default is the middle half (Jet-style).
- Default insertion: round(n_layers / 4) SSM blocks spread evenly over the looped range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.config import ModelConfig
from common.init import init_params
from common.pretrained import SourceArch

INITS = ("zero", "copy-attn")
MAX_INSERT = 4096  # sanity bound on inserted blocks


@dataclass(frozen=True)
class Plan:
    config: ModelConfig
    source_layers: tuple[int | None, ...]  # per block: the source layer it came from, None = inserted SSM
    loop: tuple[int, int]  # looped range in source layers [a, b)

    @property
    def inserted(self) -> list[int]:
        return [i for i, j in enumerate(self.source_layers) if j is None]

    def layer_map(self) -> dict[int, int]:
        """source layer j -> block index i."""
        return {j: i for i, j in enumerate(self.source_layers) if j is not None}

    def record(self, source: dict, init: str, files: list[str]) -> dict:
        """The `retrofit` record of config.json."""
        return {"source": source, "source_layers": list(self.source_layers), "inserted": self.inserted,
                "loop_source_layers": list(self.loop), "init": init, "files": files}


def parse_loop(text: str | None, n_layers: int) -> tuple[int, int]:
    """'a:b' | 'all' | None (the middle half) -> [a, b) in source layers; ValueError naming the value."""
    if text is None:
        a = n_layers // 4
        return a, max(n_layers - a, a + 1)
    if text == "all":
        return 0, n_layers
    try:
        a_text, b_text = text.split(":")
        a, b = int(a_text) if a_text else 0, int(b_text) if b_text else n_layers
    except ValueError:
        raise ValueError(f"--loop {text!r}: expected 'a:b' (source layers, b exclusive) or 'all'") from None
    if not 0 <= a < b <= n_layers:
        raise ValueError(f"--loop {text!r}: needs 0 <= a < b <= {n_layers} (the source has {n_layers} layers)")
    return a, b


def default_insert_at(loop: tuple[int, int], count: int) -> list[int]:
    """`count` insertion points spread evenly over the looped source layers [a, b)."""
    a, b = loop
    return sorted({a + ((2 * k + 1) * (b - a)) // (2 * count) for k in range(count)})


def plan(arch: SourceArch, *, insert: int | None = None, insert_at: list[int] | None = None,
         loop: str | None = None, window: int = 1024, eviction: str = "hard", passes: int = 2,
         ssm_heads: int | None = None, ssm_head_dim: int | None = None, conv_size: int = 4,
         ssm_rule: str = "delta") -> Plan:
    """The hybrid a retrofit builds: every source layer as an attention block, SSM blocks inserted."""
    n = arch.n_layers
    a, b = parse_loop(loop, n)
    if insert is not None and insert_at is not None:
        raise ValueError("give --insert K or --insert-at i,j,... (not both)")
    if insert_at is None:
        count = max(1, round(n / 4)) if insert is None else insert
        if not isinstance(count, int) or not 0 <= count <= min(b - a, MAX_INSERT):
            raise ValueError(f"--insert {count!r}: must be between 0 and the {b - a} looped source layers")
        insert_at = default_insert_at((a, b), count) if count else []
    else:
        bad = [j for j in insert_at if not isinstance(j, int) or not 0 <= j <= n]
        if bad or len(set(insert_at)) != len(insert_at) or len(insert_at) > MAX_INSERT:
            raise ValueError(f"--insert-at {insert_at}: needs distinct source layer indices in [0, {n}]")
    points = set(insert_at)
    source_layers: list[int | None] = []
    start = stop = None
    for j in range(n + 1):
        if j == a:
            start = len(source_layers)
        if j == b:
            stop = len(source_layers)
        if j in points:
            source_layers.append(None)
            if j == b:  # an SSM block in front of layer b belongs to the looped range's end
                stop = len(source_layers)
        if j < n:
            source_layers.append(j)
    if stop is None:
        stop = len(source_layers)
    pattern = "".join("S" if j is None else "A" for j in source_layers)
    heads = ssm_heads or arch.n_heads
    head_dim = ssm_head_dim or arch.head_dim
    s = arch.rope_scaling
    rope = {} if s.type == "default" else {"rope_type": s.type, "rope_factor": s.factor}
    if s.type == "llama3":
        rope.update(rope_low_freq_factor=s.low_freq_factor, rope_high_freq_factor=s.high_freq_factor,
                    rope_original_max_positions=s.original_max_position_embeddings)
    config = ModelConfig(
        vocab_size=arch.vocab_size, d_model=arch.hidden_size, n_layers=len(source_layers), pattern=pattern,
        n_heads=arch.n_heads, head_dim=arch.head_dim, n_kv_heads=arch.n_kv_heads if arch.n_kv_heads != arch.n_heads
        else None, ssm_heads=heads, ssm_head_dim=head_dim, ssm_rule=ssm_rule, conv_size=conv_size,
        mlp_hidden=arch.intermediate_size, norm_eps=arch.rms_norm_eps, rope_theta=arch.rope_theta,
        tie_embeddings=arch.tie_embeddings, window=window, eviction=eviction, sleep_passes=passes,
        sleep_layers=None if (start, stop) == (0, len(source_layers)) else (start, stop),
        attn_bias=arch.attn_bias, qk_norm=arch.qk_norm, ssm_mlp=False,
        bos_id=arch.bos_token_id if arch.bos_token_id is not None and arch.bos_token_id < arch.vocab_size else None,
        eos_ids=tuple(i for i in arch.eos_token_ids if 0 <= i < arch.vocab_size), **rope)
    return Plan(config, tuple(source_layers), (a, b))


def inserted_params(p: Plan, source: dict[str, np.ndarray], *, init: str = "zero",
                    seed: int = 0) -> dict[str, np.ndarray]:
    """Weights of the inserted SSM blocks (canonical names), as exact no-ops: `ssm.o_proj` = 0.

    The other SSM weights follow common.init (so training has something to start from); with
    init="copy-attn" the q/k/v projections are copied from the nearest source attention layer
    (key/value heads repeated to the query heads, as MambaInLlama initializes its Mamba layers),
    which needs ssm_heads x ssm_head_dim == n_heads x head_dim.
    """
    if init not in INITS:
        raise ValueError(f"--init {init!r}: must be one of {', '.join(INITS)}")
    c = p.config
    drawn = init_params(c, seed)
    out = {}
    for i in p.inserted:
        prefix = f"layers.{i}."
        for name, value in drawn.items():
            if name.startswith(prefix):
                out[name] = value
        out[prefix + "ssm.o_proj.weight"] = np.zeros_like(drawn[prefix + "ssm.o_proj.weight"])
        if init == "copy-attn":
            out.update(_copy_attention(p, i, source))
    return out


def _copy_attention(p: Plan, i: int, source: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    c = p.config
    if (c.ssm_heads, c.ssm_head_dim, c.ssm_v_dim) != (c.n_heads, c.head_dim, c.head_dim):
        raise ValueError(f"--init copy-attn needs --ssm-heads {c.n_heads} --ssm-head-dim {c.head_dim} "
                         f"(the attention's shape), got {c.ssm_heads} x {c.ssm_head_dim}")
    attention = [k for k, j in enumerate(p.source_layers) if j is not None]
    nearest = min(attention, key=lambda k: (abs(k - i), k))  # ties: the earlier block
    group = c.n_heads // c.kv_heads
    out = {}
    for name in ("q_proj", "k_proj", "v_proj"):
        w = source[f"layers.{nearest}.attn.{name}.weight"]
        if name != "q_proj" and group > 1:  # (H_kv * D, d) -> (H * D, d): each KV head serves `group` heads
            w = np.repeat(w.reshape(c.kv_heads, c.head_dim, -1), group, axis=0).reshape(-1, w.shape[-1])
        out[f"layers.{i}.ssm.{name}.weight"] = np.ascontiguousarray(w, dtype=np.float32)
    return out


def parameter_counts(p: Plan) -> tuple[int, int]:
    """(source parameters, inserted parameters) of a plan."""
    from common.checkpoint import param_shapes

    inserted = {f"layers.{i}." for i in p.inserted}
    total = new = 0
    for name, shape in param_shapes(p.config).items():
        size = math.prod(shape)
        total += size
        new += size if any(name.startswith(pre) for pre in inserted) else 0
    return total - new, new
