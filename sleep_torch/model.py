"""HybridLM: the attention-SSM hybrid that sleeps (SPEC section 3).

A token stream is cut into windows of L tokens. Each window gets one *wake* pass (its logits are
the predictions). When a window is full, a *sleep* becomes due: starting again from the window's
committed SSM states S_w, N passes run over the window, pass n+1 fed with pass n's output hidden
states; the states after the last pass become S_{w+1} and the KV cache is cleared (hard) or cut to
the last L-1 wake-pass keys/values (sliding). Pass 1 equals the wake pass, so it is reused.

`forward` and `step` share one code path (`_window`): `forward(tokens)` is `step` over the whole
sequence from a fresh State, which makes "streaming equals full forward" hold by construction of
the numbers, not by two implementations that happen to agree. Internals are pure (they return a
new State), which lets training checkpoint per window; the public `step`/`sleep` also update the
State passed in, so `model.sleep(state)` works on a background thread.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from common import memory
from common.checkpoint import atomic_file
from common.config import ModelConfig
from common.init import init_params
from sleep_torch.layers import Block, RMSNorm


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
    hidden: torch.Tensor  # wake-pass hidden states at the end of the looped range [B, offset, d]
    offset: int = 0  # tokens of the current window processed
    due: int = 0  # passes of a full window's pending sleep (0 = none due)
    seen: int = 0  # tokens seen in total
    sleeps: int = 0  # sleeps done

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        fields = (self.committed, self.running, self.conv, self.past_k, self.past_v, self.cur_k, self.cur_v)
        return [t for f in fields for t in f if t is not None] + [self.hidden]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class HybridLM(nn.Module):
    def __init__(self, config: ModelConfig, seed: int | None = 0):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.layers = nn.ModuleList(Block(c, kind) for kind in c.layer_types)
        self.norm = RMSNorm(c.d_model, c.norm_eps)
        if not c.tie_embeddings:
            self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.checkpoint_windows = False  # recompute each window in backward (training memory)
        self.tokenizer = None  # set by `load` from the folder's config.json
        self.tracer = None  # optional callback(stage, index, tensor) for parity checks (convert.parity)
        if seed is not None:  # None: weights are about to be loaded, skip drawing them
            self.load_arrays(init_params(c, seed))

    # --- weights ---------------------------------------------------------------------------------
    def load_arrays(self, arrays: dict[str, np.ndarray | torch.Tensor]) -> None:
        """Copy {canonical name: array} into the parameters (names and shapes must match exactly)."""
        params = dict(self.named_parameters())
        if set(arrays) != set(params):
            missing, extra = sorted(set(params) - set(arrays)), sorted(set(arrays) - set(params))
            raise ValueError(f"weights do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
        with torch.no_grad():
            for name, value in arrays.items():
                value = torch.as_tensor(value)
                if tuple(value.shape) != tuple(params[name].shape):
                    raise ValueError(f"{name}: shape {list(value.shape)} != model {list(params[name].shape)}")
                params[name].copy_(value)

    def set_scan_impl(self, impl: str) -> None:
        """Choose the ssm_scan implementation ("auto", "ref", "chunk", "kernel") for every SSM block."""
        for block in self.layers:
            if block.kind == "S":
                block.ssm.scan_impl = impl

    # --- public API ------------------------------------------------------------------------------
    def forward(self, tokens, passes: int | None = None):
        """Logits [B, T, V] for a whole sequence, window by window (every full window sleeps)."""
        logits, _ = self._stream(tokens, self.new_state(tokens.shape[0]), passes)
        return logits

    def new_state(self, batch_size: int) -> State:
        c, w = self.config, self.embed.weight
        n = len(self.layers)
        kv = [w.new_zeros(batch_size, 0, c.n_heads, c.head_dim) if b.kind == "A" else None for b in self.layers]
        ssm = [w.new_zeros(batch_size, c.ssm_heads, c.ssm_v_dim, c.ssm_head_dim, dtype=torch.float32)
               if b.kind == "S" else None for b in self.layers]
        return State(committed=ssm, running=list(ssm), conv=[None] * n, past_k=kv, past_v=list(kv),
                     cur_k=list(kv), cur_v=list(kv), hidden=w.new_zeros(batch_size, 0, c.d_model))

    def step(self, tokens, state: State, passes: int | None = None):
        """Stream any number of tokens [B, t]: (logits [B, t, V], state). Sleeps when a window fills."""
        logits, new = self._stream(tokens, state, passes)
        state.__dict__.update(new.__dict__)
        return logits, state

    def sleep(self, state: State, force: bool = False, passes: int | None = None) -> State:
        """Run a due sleep now (same numbers as the next `step` would give).

        force=True also consolidates a partial window now and starts a new window after it (a user
        action outside the step == forward contract); `passes` applies to that forced sleep.
        """
        if state.due:
            new = self._sleep(state, state.due)
        elif force and state.offset > 0:
            new = self._sleep(state, self._passes(passes))
        else:
            return state
        state.__dict__.update(new.__dict__)
        return state

    # --- memory files ----------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Hash of config + weights; a memory file only loads into the model that wrote it."""
        return memory.fingerprint(self.config, ((n, p.detach().float().cpu().numpy())
                                                for n, p in self.named_parameters()))

    def save_state(self, state: State, path) -> None:
        """Write a State as a memory file (safetensors, atomic); either backend reads it."""
        from safetensors.torch import save_file

        lists = {f: getattr(state, f) for f in memory.LIST_FIELDS}
        counters = {f: getattr(state, f) for f in memory.INT_FIELDS}
        tensors, meta = memory.state_to_named(lists, state.hidden, counters, self.fingerprint())
        with atomic_file(path) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)

    def load_state(self, path) -> State:
        """Read a memory file written for this model (by either backend); continuing is exact."""
        from safetensors.torch import load_file

        counters = memory.check_memory_file(path, self.fingerprint())
        device = self.embed.weight.device
        lists, hidden = memory.named_to_lists({k: v.to(device) for k, v in load_file(str(path)).items()},
                                              counters.pop("n_layers"))
        return State(**lists, hidden=hidden, **counters)

    # --- internals (pure: they return a new State) -----------------------------------------------
    def _passes(self, passes):
        passes = self.config.sleep_passes if passes is None else passes
        if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
            raise ValueError(f"passes must be an integer >= 1, got {passes!r}")
        return passes

    def _check_tokens(self, tokens, state: State):
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            raise ValueError("tokens must be an integer tensor of shape [batch, time]")
        if tokens.shape[0] != state.batch_size:
            raise ValueError(f"tokens have batch size {tokens.shape[0]}, the state {state.batch_size}")
        if tokens.numel():
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} out of range [0, {self.config.vocab_size})")

    def _stream(self, tokens, state: State, passes):
        passes = self._passes(passes)
        self._check_tokens(tokens, state)
        L, T = self.config.window, tokens.shape[1]
        outs, i = [], 0
        while i < T:
            n = min(L - state.offset if not state.due else L, T - i)
            piece = tokens[:, i:i + n]
            if self.checkpoint_windows and torch.is_grad_enabled():
                logits, state = checkpoint(self._window, piece, state, passes, use_reentrant=False)
            else:
                logits, state = self._window(piece, state, passes)
            outs.append(logits)
            i += n
        if not outs:
            return self.embed.weight.new_zeros(tokens.shape[0], 0, self.config.vocab_size), state
        return torch.cat(outs, 1), state

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
                past_k = torch.cat([state.past_k[i], state.cur_k[i]], 1)
                past_v = torch.cat([state.past_v[i], state.cur_v[i]], 1)
                h, (k, v) = block(h, past_k, past_v, state.offset)
                cur_k[i], cur_v[i] = torch.cat([cur_k[i], k], 1), torch.cat([cur_v[i], v], 1)
            else:
                h, (running[i], conv[i]) = block(h, running[i], conv[i])
            if i == b - 1:
                hidden = torch.cat([hidden, h], 1)
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
                all_k = torch.cat([state.past_k[i], state.cur_k[i]], 1)
                all_v = torch.cat([state.past_v[i], state.cur_v[i]], 1)
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
        return h @ weight.t()
