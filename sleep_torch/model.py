"""HybridLM: the attention-SSM hybrid that sleeps (SPEC section 3), in PyTorch.

A token stream is cut into windows of L tokens. Each window gets one *wake* pass (its logits are
the predictions). When a window is full, a *sleep* becomes due: N passes over the window write it
into the SSM blocks' fast weights, then the KV cache is evicted. The schedule itself (wake, due
sleep, passes, coda, eviction) and the State (one cache per block) live in common/sleep.py, written
once for both backends; this file holds the modules and what only torch can do (checkpointing a
window in backward, tensors in and out of memory files).

`forward` and `step` share one code path: `forward(tokens)` is `step` over the whole sequence from
a fresh State, which makes "streaming equals full forward" hold by construction of the numbers.
The schedule is pure (it returns a new State), which lets training checkpoint per window; the
public `step`/`sleep` also update the State passed in, so `model.sleep(state)` works on a
background thread.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from common import checkpoint as ckpt
from common import memory
from common import sleep as schedule
from common.checkpoint import atomic_file
from common.config import ModelConfig
from common.init import init_params
from common.sleep import State
from sleep_torch.layers import Block, RMSNorm


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
        # Set by `load`: the folder's tokenizer and (pretrained models) chat template. `tracer`: an optional
        # callback(stage, index, tensor) that convert.parity uses to record every stage.
        self.tokenizer = self.chat_template = self.tracer = None
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

    def for_inference(self) -> HybridLM:
        """Ready for generation (chat, serve, generate): eval mode, no gradients, and the weights laid out
        for one-token steps without copies: every layers.LinearPack packed (q/k/v, gate/up and the SSM
        inputs as one product each, stored transposed where MKL's one-token product is faster) and the
        LM head's matrix stored transposed (docs/DESIGN.md "Inference layout"). The numbers equal the
        default layout's up to float rounding (summation order). Returns self."""
        self.eval().requires_grad_(False)
        for block in self.layers:
            for pack in block.packs():
                pack.pack()
        head = self.embed.weight if self.config.tie_embeddings else self.lm_head.weight
        head.data = head.detach().t().contiguous().t()
        return self

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
        """An empty stream: one empty cache per block, no hidden states, window offset 0."""
        hidden = self.embed.weight.new_zeros(batch_size, 0, self.config.d_model)
        return State(caches=[block.new_cache(batch_size) for block in self.layers], hidden=hidden)

    def step(self, tokens, state: State, passes: int | None = None, last: bool = False):
        """Stream any number of tokens [B, t]: (logits [B, t, V], state). Sleeps when a window fills.

        last=True: the logits of the last token only, [B, 1, V] (generation: no LM head over a prompt).
        """
        logits, new = self._stream(tokens, state, passes, last=last)
        return logits, state.update(new)

    def sleep(self, state: State, force: bool = False, passes: int | None = None) -> State:
        """Run a due sleep now (same numbers as the next `step` would give).

        force=True also consolidates a partial window now and starts a new window after it (a user
        action outside the step == forward contract); `passes` applies to that forced sleep.
        """
        new = schedule.sleep_now(self, state, force, passes, torch.cat)
        return state if new is None else state.update(new)

    # --- memory files ----------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Hash of config + weights; a memory file only loads into the model that wrote it (remembered
        until the config or a parameter changes)."""
        return memory.remembered_fingerprint(self, list(self.named_parameters()), lambda p: p._version,
                                             lambda p: p.detach().float().cpu().numpy())

    def save_state(self, state: State, path) -> None:
        """Write a State as a memory file (safetensors, atomic); either backend reads it."""
        from safetensors.torch import save_file

        tensors, meta = memory.state_to_named(state, self.fingerprint())
        with atomic_file(path) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)

    def load_state(self, path) -> State:
        """Read a memory file written for this model (by either backend); continuing is exact."""
        from safetensors.torch import load_file

        dtype = ckpt.DTYPE_TAGS[str(self.embed.weight.dtype).rsplit(".", 1)[-1]]
        counters = memory.check_memory_file(path, self.fingerprint(), self.config, dtype)  # shapes, dtypes, finite
        device = self.embed.weight.device
        tensors = {k: v.to(device) for k, v in load_file(str(path)).items()}
        state = memory.named_to_state(tensors, self.config.layer_types, counters, torch.cat)
        return memory.rotate_v1_keys(state, self.layers, counters["format_version"])

    # --- internals (pure: they return a new State) -----------------------------------------------
    def _passes(self, passes) -> int:
        return schedule.check_passes(passes, self.config.sleep_passes)

    def _check_tokens(self, tokens, state: State):
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            raise ValueError("tokens must be an integer tensor of shape [batch, time]")
        lo, hi = (int(tokens.min()), int(tokens.max())) if tokens.numel() else (0, 0)
        schedule.check_token_ids(tokens.shape[0], state.batch_size, lo, hi, self.config.vocab_size)

    def _stream(self, tokens, state: State, passes, last: bool = False):
        """Window by window (common.sleep); each window is recomputed in backward when
        `checkpoint_windows` is on."""
        passes = self._passes(passes)
        self._check_tokens(tokens, state)
        checkpointed = self.checkpoint_windows and torch.is_grad_enabled()
        run = self._checkpointed_window if checkpointed else self._window
        if last:  # generation (never differentiated): the plain window with the last token's logits
            run = lambda piece, s, n: self._window(piece, s, n, True)  # noqa: E731
        outs, state = schedule.stream(tokens, state, self.config.window, lambda piece, s: run(piece, s, passes))
        outs = outs[-1:] if last else outs
        if not outs:
            return self.embed.weight.new_zeros(tokens.shape[0], 0, self.config.vocab_size), state
        return torch.cat(outs, 1), state

    def _checkpointed_window(self, tokens, state: State, passes: int):
        """`_window` under torch.utils.checkpoint: recomputed in backward."""
        return checkpoint(self._window, tokens, state, passes, use_reentrant=False)

    def _window(self, tokens, state: State, passes: int, last: bool = False):
        return schedule.window(self, tokens, state, passes, torch.cat, last)

    def head(self, h):
        h = self.norm(h)
        weight = self.embed.weight if self.config.tie_embeddings else self.lm_head.weight
        return h @ weight.t()
