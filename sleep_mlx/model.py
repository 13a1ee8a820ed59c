"""HybridLM: the attention-SSM hybrid that sleeps (SPEC section 3), MLX mirror of sleep_torch/model.py.

A token stream is cut into windows of L tokens. Each window gets one *wake* pass (its logits are
the predictions). When a window is full, a *sleep* becomes due: starting again from the window's
committed SSM states S_w, N passes run over the window, pass n+1 fed with pass n's output hidden
states; the states after the last pass become S_{w+1} and the KV cache is cleared (hard) or cut to
the last L-1 wake-pass keys/values (sliding). Pass 1 equals the wake pass, so it is reused.

`__call__` and `step` share one code path (`_window`): `model(tokens)` is `step` over the whole
sequence from a fresh State, which makes "streaming equals full forward" hold by construction of
the numbers. Internals are pure (they return a new State), which lets training checkpoint per
window; the public `step`/`sleep` also update the State passed in.

Laziness: `model(tokens)` (training, evaluation) builds one lazy graph and never calls mx.eval, so
it stays differentiable and the caller decides when to evaluate. `step` evaluates the logits and
the new State after every window and `sleep` evaluates the State it produces: a stream of any
length then holds a bounded graph, and a sleep run between chat turns really runs then.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from common import memory
from common.checkpoint import atomic_file
from common.config import ModelConfig
from common.init import init_params
from sleep_mlx.layers import Block, RMSNorm


@dataclasses.dataclass
class State:
    """What a stream carries between calls. Lists hold one entry per block (None where unused).

    Bounded however long the stream: per attention block at most 2L-1 keys/values, per SSM block
    the committed and the running state plus a conv tail, and one window of hidden states.
    """

    committed: list  # SSM blocks: S_w, the state the current window started from [B, H, Dv, Dk] fp32
    running: list  # SSM blocks: state after the wake pass over the window so far
    conv: list  # SSM blocks: last K-1 conv inputs of the window so far (None at a window start)
    past_k: list  # attention blocks: keys kept from before the window (sliding) [B, P, H, D]
    past_v: list
    cur_k: list  # attention blocks: wake-pass keys of the current window [B, offset, H, D]
    cur_v: list
    hidden: mx.array  # wake-pass hidden states at the end of the looped range [B, offset, d]
    offset: int = 0  # tokens of the current window processed
    due: int = 0  # passes of a full window's pending sleep (0 = none due)
    seen: int = 0  # tokens seen in total
    sleeps: int = 0  # sleeps done

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    def tensors(self) -> list[mx.array]:
        fields = (self.committed, self.running, self.conv, self.past_k, self.past_v, self.cur_k, self.cur_v)
        return [t for f in fields for t in f if t is not None] + [self.hidden]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())


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
        self.tokenizer = None  # set by `load` from the folder's config.json
        self.tracer = None  # optional callback(stage, index, array) for parity checks (convert.parity)
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

    def set_scan_impl(self, impl: str) -> None:
        """Choose the ssm_scan implementation ("auto", "ref", "chunk", "kernel") for every SSM block."""
        for block in self.layers:
            if block.kind == "S":
                block.ssm.scan_impl = impl

    # --- public API ------------------------------------------------------------------------------
    def __call__(self, tokens, passes: int | None = None):
        """Logits [B, T, V] for a whole sequence, window by window (every full window sleeps). Lazy."""
        batch = tokens.shape[0] if _is_2d(tokens) else 1  # a bad `tokens` is reported by _check_tokens
        logits, _ = self._stream(tokens, self.new_state(batch), passes)
        return logits

    def new_state(self, batch_size: int) -> State:
        c, dtype = self.config, self.embed.weight.dtype
        n = len(self.layers)
        kv = [mx.zeros((batch_size, 0, c.n_heads, c.head_dim), dtype=dtype) if b.kind == "A" else None
              for b in self.layers]
        ssm = [mx.zeros((batch_size, c.ssm_heads, c.ssm_v_dim, c.ssm_head_dim), dtype=mx.float32)
               if b.kind == "S" else None for b in self.layers]
        return State(committed=ssm, running=list(ssm), conv=[None] * n, past_k=kv, past_v=list(kv),
                     cur_k=list(kv), cur_v=list(kv), hidden=mx.zeros((batch_size, 0, c.d_model), dtype=dtype))

    def step(self, tokens, state: State, passes: int | None = None):
        """Stream any number of tokens [B, t]: (logits [B, t, V], state). Sleeps when a window fills.

        Evaluates after every window, so the lazy graph never grows across windows or calls.
        """
        logits, new = self._stream(tokens, state, passes, materialize=True)
        state.__dict__.update(new.__dict__)
        return logits, state

    def sleep(self, state: State, force: bool = False, passes: int | None = None) -> State:
        """Run a due sleep now (same numbers as the next `step` would give); evaluated before returning.

        force=True also consolidates a partial window now and starts a new window after it (a user
        action outside the step == forward contract); `passes` applies to that forced sleep.
        """
        if state.due:
            new = self._sleep(state, state.due)
        elif force and state.offset > 0:
            new = self._sleep(state, self._passes(passes))
        else:
            return state
        mx.eval(new.tensors())  # lazy MLX would otherwise defer the work to the next step
        state.__dict__.update(new.__dict__)
        return state

    # --- memory files ----------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Hash of config + weights; a memory file only loads into the model that wrote it."""
        return memory.fingerprint(self.config, ((n, np.array(p.astype(mx.float32)))
                                                for n, p in tree_flatten(self.parameters())))

    def save_state(self, state: State, path) -> None:
        """Write a State as a memory file (safetensors, atomic); either backend reads it."""
        lists = {f: getattr(state, f) for f in memory.LIST_FIELDS}
        counters = {f: getattr(state, f) for f in memory.INT_FIELDS}
        tensors, meta = memory.state_to_named(lists, state.hidden, counters, self.fingerprint())
        with atomic_file(path) as tmp:
            target = tmp.with_suffix(".safetensors")  # mx.save_safetensors appends the suffix otherwise
            mx.save_safetensors(str(target), tensors, metadata=meta)
            target.replace(tmp)

    def load_state(self, path) -> State:
        """Read a memory file written for this model (by either backend); continuing is exact."""
        counters = memory.check_memory_file(path, self.fingerprint())
        lists, hidden = memory.named_to_lists(mx.load(str(path)), counters.pop("n_layers"))
        return State(**lists, hidden=hidden, **counters)

    # --- internals (pure: they return a new State) -----------------------------------------------
    def _passes(self, passes):
        passes = self.config.sleep_passes if passes is None else passes
        if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
            raise ValueError(f"passes must be an integer >= 1, got {passes!r}")
        return passes

    def _check_tokens(self, tokens, state: State):
        if not _is_2d(tokens) or not mx.issubdtype(tokens.dtype, mx.integer):
            raise ValueError("tokens must be an integer array of shape [batch, time]")
        if tokens.shape[0] != state.batch_size:
            raise ValueError(f"tokens have batch size {tokens.shape[0]}, the state {state.batch_size}")
        if tokens.size:
            lo, hi = tokens.min().item(), tokens.max().item()
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} out of range [0, {self.config.vocab_size})")

    def _stream(self, tokens, state: State, passes, materialize: bool = False):
        """Window by window; materialize=True (step) evaluates each window's logits and State."""
        passes = self._passes(passes)
        self._check_tokens(tokens, state)
        L, T = self.config.window, tokens.shape[1]
        outs, i = [], 0
        while i < T:
            n = min(L - state.offset if not state.due else L, T - i)
            piece = tokens[:, i:i + n]
            if self.checkpoint_windows:
                logits, state = self._checkpointed_window(piece, state, passes)
            else:
                logits, state = self._window(piece, state, passes)
            if materialize:
                mx.eval(logits, state.tensors())
            outs.append(logits)
            i += n
        if not outs:
            return mx.zeros((tokens.shape[0], 0, self.config.vocab_size), dtype=self.embed.weight.dtype), state
        return mx.concatenate(outs, 1), state

    def _checkpointed_window(self, tokens, state: State, passes: int):
        """`_window` under nn.utils.checkpoint: recomputed in backward.

        mx.checkpoint takes trees of arrays, not a State, and differentiates every array input, so
        the State travels as a dict and the integer tokens are closed over rather than passed.
        """
        def window(fields):
            logits, new = self._window(tokens, State(**fields), passes)
            return logits, dict(vars(new))

        logits, fields = nn.utils.checkpoint(self, window)(dict(vars(state)))
        return logits, State(**fields)

    def _window(self, tokens, state: State, passes: int):
        """Sleep if due, then wake over tokens that all fall in the current window."""
        if state.due:
            state = self._sleep(state, state.due)
        logits, state = self._wake(tokens, state)
        if state.offset == self.config.window:
            state = dataclasses.replace(state, due=passes)
        return logits, state

    def _wake(self, tokens, state: State):
        a, b = self.config.loop_range
        running, conv = list(state.running), list(state.conv)
        cur_k, cur_v = list(state.cur_k), list(state.cur_v)
        hidden = state.hidden
        h = self.embed(tokens)  # (B, t, d)
        self._trace("embed", 0, h)
        for i, block in enumerate(self.layers):
            if block.kind == "A":
                past_k = mx.concatenate([state.past_k[i], state.cur_k[i]], 1)
                past_v = mx.concatenate([state.past_v[i], state.cur_v[i]], 1)
                h, (k, v) = block(h, past_k, past_v, state.offset)
                cur_k[i], cur_v[i] = mx.concatenate([cur_k[i], k], 1), mx.concatenate([cur_v[i], v], 1)
            else:
                h, (running[i], conv[i]) = block(h, running[i], conv[i])
            if i == b - 1:
                hidden = mx.concatenate([hidden, h], 1)
            self._trace("block", i, h)
        t = tokens.shape[1]
        new = dataclasses.replace(state, running=running, conv=conv, cur_k=cur_k, cur_v=cur_v, hidden=hidden,
                                  offset=state.offset + t, seen=state.seen + t)
        return self.head(h), new

    def _full_pass(self, i: int, h, ssm_state, state: State):
        """Block i over a whole window from a fresh conv tail; attention sees the kept past only."""
        block = self.layers[i]
        if block.kind == "A":
            h, _ = block(h, state.past_k[i], state.past_v[i], 0)
            return h, None
        h, (ssm_state, _) = block(h, ssm_state, None)
        return h, ssm_state

    def _sleep(self, state: State, passes: int) -> State:
        a, b = self.config.loop_range
        committed = list(state.running)  # pass 1 = the wake pass; N = 1 commits it as is
        if passes > 1:
            h = state.hidden  # pass 1's output at the end of the looped range
            for n in range(2, passes + 1):
                for i in range(a, b):
                    h, committed[i] = self._full_pass(i, h, committed[i], state)
                    self._trace(f"sleep{n}.state", i, committed[i])
            for i in range(b, len(self.layers)):  # coda: again from S_w on the last loop's output
                h, committed[i] = self._full_pass(i, h, state.committed[i], state)
                self._trace("coda.state", i, committed[i])
        keep = self.config.window - 1 if self.config.eviction == "sliding" else 0
        past_k, past_v = list(state.past_k), list(state.past_v)
        cur_k, cur_v = list(state.cur_k), list(state.cur_v)
        for i, block in enumerate(self.layers):
            if block.kind == "A":
                all_k = mx.concatenate([state.past_k[i], state.cur_k[i]], 1)
                all_v = mx.concatenate([state.past_v[i], state.cur_v[i]], 1)
                start = max(all_k.shape[1] - keep, 0)
                past_k[i], past_v[i] = all_k[:, start:], all_v[:, start:]
                cur_k[i], cur_v[i] = all_k[:, :0], all_v[:, :0]
        return dataclasses.replace(state, committed=committed, running=list(committed),
                                   conv=[None] * len(self.layers), past_k=past_k, past_v=past_v,
                                   cur_k=cur_k, cur_v=cur_v, hidden=state.hidden[:, :0], offset=0, due=0,
                                   sleeps=state.sleeps + 1)

    def _trace(self, stage: str, index: int, value) -> None:
        if self.tracer is not None and value is not None:
            self.tracer(stage, index, value)

    def head(self, h):
        h = self.norm(h)
        weight = self.embed.weight if self.config.tie_embeddings else self.lm_head.weight
        return h @ weight.T


def _is_2d(tokens) -> bool:
    return isinstance(tokens, mx.array) and tokens.ndim == 2
