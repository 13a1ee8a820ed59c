"""HybridLM: the attention-SSM hybrid that sleeps (SPEC section 3), MLX mirror of sleep_torch/model.py.

The schedule (wake, due sleep, passes, coda, eviction) and the State (one cache per block) live in
common/sleep.py, written once for both backends; this file holds the modules and what only MLX
needs: evaluation points, checkpointing a window through mx.checkpoint, memory-file tensors.

`__call__` and `step` share one code path: `model(tokens)` is `step` over the whole sequence from a
fresh State, which makes "streaming equals full forward" hold by construction of the numbers. The
schedule is pure (it returns a new State), which lets training checkpoint per window; the public
`step`/`sleep` also update the State passed in.

Laziness: `model(tokens)` (training, evaluation) builds one lazy graph and never calls mx.eval, so
it stays differentiable and the caller decides when to evaluate. `step` evaluates the logits and
the new State after every window and `sleep` evaluates the State it produces: a stream of any
length then holds a bounded graph, and a sleep run between chat turns really runs then.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from common import checkpoint as ckpt
from common import memory
from common import sleep as schedule
from common.checkpoint import atomic_file
from common.config import ModelConfig
from common.init import init_params
from common.sleep import State
from sleep_mlx.layers import Block, RMSNorm


class HybridLM(nn.Module):
    def __init__(self, config: ModelConfig, seed: int | None = 0):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.layers = [Block(c, kind) for kind in c.layer_types]
        self.norm = RMSNorm(c.d_model, c.norm_eps)
        if not c.tie_embeddings:
            self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.checkpoint_windows = False  # recompute each window in backward (training memory)
        # Set by `load`: the folder's tokenizer and (pretrained models) chat template. `tracer`: an optional
        # callback(stage, index, array) that convert.parity uses to record every stage.
        self.tokenizer = self.chat_template = self.tracer = None
        if seed is not None:  # None: weights are about to be loaded (MLX's own init stays lazy, never run)
            self.load_arrays(init_params(c, seed))

    # --- weights ---------------------------------------------------------------------------------
    def load_arrays(self, arrays: dict[str, np.ndarray | mx.array]) -> None:
        """Copy {canonical name: array} into the parameters (names and shapes must match exactly)."""
        params = dict(tree_flatten(self.parameters()))
        if set(arrays) != set(params):
            missing, extra = sorted(set(params) - set(arrays)), sorted(set(arrays) - set(params))
            raise ValueError(f"weights do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
        new = []
        for name, value in arrays.items():
            value = value if isinstance(value, mx.array) else mx.array(np.asarray(value))
            if tuple(value.shape) != tuple(params[name].shape):
                raise ValueError(f"{name}: shape {list(value.shape)} != model {list(params[name].shape)}")
            new.append((name, value.astype(params[name].dtype)))  # keep the model's dtype, like copy_
        self.update(tree_unflatten(new))
        mx.eval(self.parameters())  # loading is eager, as in torch

    def for_inference(self) -> HybridLM:
        """Ready for generation (chat, serve, generate): eval mode, and the weights laid out for decoding
        without copies: every layers.LinearPack packed (q/k/v, gate/up and the SSM inputs as one product
        each, every matrix stored transposed, where mlx[cpu]'s products run about 2x faster) and the LM
        head's matrix stored transposed; quantized layers stay as they are (docs/DESIGN.md "Inference
        layout"). The numbers equal the default layout's. Returns self."""
        self.eval()
        for block in self.layers:
            for pack in block.packs():
                pack.pack()
        owner = self.embed if self.config.tie_embeddings else self.lm_head
        if type(owner) in (nn.Embedding, nn.Linear):  # not a quantized head
            owner.weight = mx.contiguous(owner.weight.T).T
            mx.eval(owner.weight)
        return self

    def set_scan_impl(self, impl: str) -> None:
        """Choose the ssm_scan implementation ("auto", "ref", "chunk", "kernel") for every SSM block."""
        for block in self.layers:
            if block.kind == "S":
                block.ssm.scan_impl = impl

    # --- public API ------------------------------------------------------------------------------
    def __call__(self, tokens, passes: int | None = None):
        """Logits [B, T, V] for a whole sequence, window by window (every full window sleeps). Lazy."""
        two_d = isinstance(tokens, mx.array) and tokens.ndim == 2  # a bad `tokens` is reported by _check_tokens
        batch = tokens.shape[0] if two_d else 1
        logits, _ = self._stream(tokens, self.new_state(batch), passes)
        return logits

    def new_state(self, batch_size: int) -> State:
        """An empty stream: one empty cache per block, no hidden states, window offset 0."""
        hidden = mx.zeros((batch_size, 0, self.config.d_model), dtype=self.embed.weight.dtype)
        return State(caches=[block.new_cache(batch_size) for block in self.layers], hidden=hidden)

    def step(self, tokens, state: State, passes: int | None = None, last: bool = False):
        """Stream any number of tokens [B, t]: (logits [B, t, V], state). Sleeps when a window fills.

        last=True: the logits of the last token only, [B, 1, V] (generation: no LM head over a prompt).

        Evaluates after every window, so the lazy graph never grows across windows or calls.
        """
        logits, new = self._stream(tokens, state, passes, materialize=True, last=last)
        return logits, state.update(new)

    def sleep(self, state: State, force: bool = False, passes: int | None = None) -> State:
        """Run a due sleep now, as sleep_torch's `sleep` does, and evaluate it before returning (lazy
        MLX would otherwise defer the work to the next step, e.g. past a chat's idle time)."""
        new = schedule.sleep_now(self, state, force, passes, mx.concatenate)
        if new is None:
            return state
        mx.eval(new.tensors())
        return state.update(new)

    # --- memory files ----------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Hash of config + weights; a memory file only loads into the model that wrote it (remembered
        until the config or a parameter changes)."""
        return memory.remembered_fingerprint(self, tree_flatten(self.parameters()), lambda p: 0,
                                             lambda p: np.array(p.astype(mx.float32)))

    def save_state(self, state: State, path) -> None:
        """Write a State as a memory file (safetensors, atomic); either backend reads it."""
        tensors, meta = memory.state_to_named(state, self.fingerprint())
        with atomic_file(path) as tmp:
            target = tmp.with_suffix(".safetensors")  # mx.save_safetensors appends the suffix otherwise
            mx.save_safetensors(str(target), tensors, metadata=meta)
            target.replace(tmp)

    def load_state(self, path) -> State:
        """Read a memory file written for this model (by either backend); continuing is exact."""
        dtype = ckpt.DTYPE_TAGS[str(self.embed.weight.dtype).rsplit(".", 1)[-1]]
        counters = memory.check_memory_file(path, self.fingerprint(), self.config, dtype)  # shapes, dtypes, finite
        tensors = mx.load(str(path), format="safetensors")
        state = memory.named_to_state(tensors, self.config.layer_types, counters, mx.concatenate)
        return memory.rotate_v1_keys(state, self.layers, counters["format_version"])

    # --- internals (pure: they return a new State) -----------------------------------------------
    def _passes(self, passes) -> int:
        return schedule.check_passes(passes, self.config.sleep_passes)

    def _check_tokens(self, tokens, state: State):
        if not isinstance(tokens, mx.array) or tokens.ndim != 2 or not mx.issubdtype(tokens.dtype, mx.integer):
            raise ValueError("tokens must be an integer array of shape [batch, time]")
        lo, hi = (tokens.min().item(), tokens.max().item()) if tokens.size else (0, 0)
        schedule.check_token_ids(tokens.shape[0], state.batch_size, lo, hi, self.config.vocab_size)

    def _stream(self, tokens, state: State, passes, materialize: bool = False, last: bool = False):
        """Window by window (common.sleep); materialize=True (step) evaluates each window's logits
        and State; each window is recomputed in backward when `checkpoint_windows` is on."""
        passes = self._passes(passes)
        self._check_tokens(tokens, state)
        run = self._checkpointed_window if self.checkpoint_windows else self._window

        def run_window(piece, s):
            logits, s = self._window(piece, s, passes, last) if last else run(piece, s, passes)
            if materialize:
                mx.eval(logits, s.tensors())
            return logits, s

        outs, state = schedule.stream(tokens, state, self.config.window, run_window)
        outs = outs[-1:] if last else outs
        if not outs:
            return mx.zeros((tokens.shape[0], 0, self.config.vocab_size), dtype=self.embed.weight.dtype), state
        return mx.concatenate(outs, 1), state

    def _checkpointed_window(self, tokens, state: State, passes: int):
        """`_window` under nn.utils.checkpoint: recomputed in backward.

        mx.checkpoint takes trees of arrays, not a State, and differentiates every array input, so
        the State travels as a tree (common.sleep.to_tree) and the integer tokens are closed over.
        """
        kinds = [type(cache) for cache in state.caches]

        def window(tree):
            logits, new = self._window(tokens, schedule.from_tree(tree, kinds), passes)
            return logits, schedule.to_tree(new)

        logits, tree = nn.utils.checkpoint(self, window)(schedule.to_tree(state))
        return logits, schedule.from_tree(tree, kinds)

    def _window(self, tokens, state: State, passes: int, last: bool = False):
        return schedule.window(self, tokens, state, passes, mx.concatenate, last)

    def head(self, h):
        h = self.norm(h)
        weight = self.embed.weight if self.config.tie_embeddings else self.lm_head.weight
        return h @ weight.T

