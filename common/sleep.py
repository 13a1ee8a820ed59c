"""The sleep schedule (SPEC section 3), written once for both backends.

A stream's `State` holds one cache per block plus the current window's wake-pass hidden states.
The functions below run the schedule of a window on any HybridLM (torch or MLX):

    stream(tokens, state, window_size, run_window)  cut a call's tokens into per-window pieces
    window(model, tokens, state, passes, cat)   due sleep (if any), then the wake pass
    wake(model, tokens, state, cat)             every block once over tokens of the current window
    sleep(model, state, passes, cat)            N-1 more passes over the looped range, the coda, eviction

They never touch a framework: arrays are only sliced, measured (`.shape`) and joined with the
`cat(arrays, axis)` primitive the backend passes in (torch.cat / mx.concatenate), and blocks are
called through their cache class, which knows its block's calling convention. Which block runs
when during a sleep is `sleep_plan`, the one description of the schedule that the model, the FLOP
count (lmsleep bench train) and the parity report (convert.parity) all read.

Adding a block kind: a cache class here (fields, `wake`, `replay`, `evict`, `woken`, `window_start`,
`from_named` when a memory file's names differ from its fields),
registered in CACHE_OF_KIND, and the block's module in each backend's layers.py. Nothing else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

Cat = Callable[[list, int], Any]  # torch.cat / mx.concatenate


# --- the schedule of one sleep ---------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """One block run over a whole window during a sleep (after pass 1, which is the wake pass)."""

    stage: str  # "pass{n}" for pass n = 2..N over the looped range, "coda" for the blocks after it
    block: int
    start: str  # "carry": from this block's state after its previous run; "window_start": from S_w


def sleep_plan(n_layers: int, loop_range: tuple[int, int], passes: int) -> list[Run]:
    """Block runs of one sleep with `passes` = N, in order (SPEC section 3).

    Pass 1 is the wake pass (reused, not run again). Passes 2..N run the looped blocks [a, b), each
    continuing from its own state after the previous pass; then the coda blocks [b, n_layers) run
    once on the last loop's output, starting again from S_w. N = 1: nothing runs, the wake state is
    committed. The prelude [0, a) never runs again: its wake pass is its only pass.
    """
    if passes <= 1:
        return []
    a, b = loop_range
    runs = [Run(f"pass{n}", i, "carry") for n in range(2, passes + 1) for i in range(a, b)]
    return runs + [Run("coda", i, "window_start") for i in range(b, n_layers)]


def pieces(n_tokens: int, offset: int, window: int) -> list[tuple[int, int]]:
    """Split `n_tokens` new tokens into [start, stop) pieces that each stay inside one window.

    `offset` is how many tokens of the current window are already processed (== window when a
    full window's sleep is due: the next piece starts a new window).
    """
    out, start = [], 0
    room = window - offset if offset < window else window
    while start < n_tokens:
        stop = min(start + room, n_tokens)
        out.append((start, stop))
        start, room = stop, window
    return out


def check_passes(passes, default: int) -> int:
    """`passes` (None = the config's N) as a validated integer >= 1."""
    passes = default if passes is None else passes
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ValueError(f"passes must be an integer >= 1, got {passes!r}")
    return passes


def check_token_ids(batch: int, state_batch: int, lo: int, hi: int, vocab_size: int) -> None:
    """Refuse tokens [batch, T] whose ids span [lo, hi] for a State of `state_batch` rows."""
    if batch != state_batch:
        raise ValueError(f"tokens have batch size {batch}, the state {state_batch}")
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token id {lo if lo < 0 else hi} out of range [0, {vocab_size})")


# --- per-block caches ----------------------------------------------------------------------------

class _Cache:
    FIELDS: ClassVar[tuple[str, ...]] = ()

    def tensors(self) -> list:
        return [t for t in (getattr(self, f) for f in self.FIELDS) if t is not None]

    def named(self) -> dict[str, Any]:
        """{field: array} without the empty (None) fields: the memory-file entries of this block."""
        return {f: getattr(self, f) for f in self.FIELDS if getattr(self, f) is not None}


@dataclass
class AttentionCache(_Cache):
    """An attention block's keys/values: buffers [B, capacity, H_kv, D], keys stored ROTATED.

    Slots [0, past) hold the tokens kept from before the current window (sliding eviction: at most
    L-1, window positions -past..-1), slots [past, length) the current window's wake-pass tokens
    (positions 0..length-past-1); slots beyond `length` are free room. Each key is rotated once, when
    it is computed, at its window-relative position; a sliding eviction re-rotates the kept keys once
    by -offset (rotary composes: R(p - o) = R(-o) R(p)). The block's module (layers.Attention) does
    the writes: in place into the free room where that is safe (torch, no autograd), else a new array.
    `mark` (torch): [length written] shared by the caches that share the buffers, so a stale State can
    never overwrite slots a newer one uses (it copies instead); None = do not write in place.
    Memory files hold the views `past_k`/`cur_k`/... under the names of FIELDS.
    """

    FIELDS: ClassVar[tuple[str, ...]] = ("past_k", "past_v", "cur_k", "cur_v")  # memory-file names
    k: Any
    v: Any
    past: int = 0
    length: int = 0
    mark: Any = None

    @property
    def past_k(self):
        return self.k[:, :self.past]

    @property
    def past_v(self):
        return self.v[:, :self.past]

    @property
    def cur_k(self):
        return self.k[:, self.past:self.length]

    @property
    def cur_v(self):
        return self.v[:, self.past:self.length]

    def tensors(self) -> list:
        return [self.k, self.v]  # the whole buffers (free room included): what the State really holds

    @classmethod
    def from_named(cls, fields: dict, cat: Cat) -> AttentionCache:
        """From a memory file's past_k/past_v/cur_k/cur_v (keys as the file holds them)."""
        k, v = cat([fields["past_k"], fields["cur_k"]], 1), cat([fields["past_v"], fields["cur_v"]], 1)
        return cls(k, v, past=fields["past_k"].shape[1], length=k.shape[1])

    def wake(self, block, h, offset: int, cat: Cat):
        """The wake pass over new tokens at window positions offset..: they see past + current keys,
        and their keys/values join the cache."""
        h, (cache,) = block(h, self, offset, True)
        return h, cache

    def woken(self):
        return None  # attention carries nothing from pass to pass

    def window_start(self):
        return None

    def replay(self, block, h, carry):
        """A sleep pass over the whole window: in-window keys of this pass plus the kept past only."""
        h, _ = block(h, self, 0, False)
        return h, None

    def evict(self, block, carry, keep: int, cat: Cat) -> AttentionCache:
        """After a sleep: keep the last `keep` wake-pass keys/values (0 = hard eviction)."""
        return block.attn.evict(self, keep)


@dataclass
class SSMCache(_Cache):
    """An SSM block's fast weights [B, H, Dv, Dk] float32 and its short-conv tail.

    `committed`: S_w, the state the current window started from; `running`: the state after the
    wake pass over the window so far; `conv`: the last K-1 conv inputs of the window (None at a
    window start, where the SPEC pads with zeros).
    """

    FIELDS: ClassVar[tuple[str, ...]] = ("committed", "running", "conv")
    committed: Any
    running: Any
    conv: Any = None

    def wake(self, block, h, offset: int, cat: Cat):
        h, (running, conv) = block(h, self.running, self.conv)
        return h, dataclasses.replace(self, running=running, conv=conv)

    def woken(self):
        return self.running  # pass 1 of a sleep is the wake pass: pass 2 continues from here

    def window_start(self):
        return self.committed  # S_w: where the coda starts again

    def replay(self, block, h, carry):
        """A sleep pass over the whole window from state `carry`, with a fresh (zero) conv tail."""
        h, (state, _) = block(h, carry, None)
        return h, state

    def evict(self, block, carry, keep: int, cat: Cat) -> SSMCache:
        """After a sleep: the state of the last run is S_{w+1}."""
        return SSMCache(committed=carry, running=carry, conv=None)


CACHE_OF_KIND = {"A": AttentionCache, "S": SSMCache}  # block kind (ModelConfig.layer_types) -> cache


# --- the stream's state ---------------------------------------------------------------------------

@dataclass
class State:
    """What a stream carries between calls: bounded however long the stream (SPEC section 3)."""

    caches: list  # one cache per block (AttentionCache / SSMCache)
    hidden: Any  # wake-pass hidden states at the end of the looped range [B, offset, d]
    offset: int = 0  # tokens of the current window processed
    due: int = 0  # passes of a full window's pending sleep (0 = none due)
    seen: int = 0  # tokens seen in total
    sleeps: int = 0  # sleeps done

    COUNTERS: ClassVar[tuple[str, ...]] = ("offset", "due", "seen", "sleeps")

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    def tensors(self) -> list:
        return [t for c in self.caches for t in c.tensors()] + [self.hidden]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def counters(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.COUNTERS}

    def update(self, new: State) -> State:
        """Make this State (the caller's object) equal `new`; returns self."""
        self.__dict__.update(new.__dict__)
        return self


def to_tree(state: State) -> dict:
    """The State as plain dicts and lists (for mx.checkpoint, which takes trees of arrays)."""
    return {"caches": [dict(vars(c)) for c in state.caches], "hidden": state.hidden, **state.counters()}


def from_tree(tree: dict, kinds: list[type]) -> State:
    """Inverse of `to_tree`; `kinds` are the cache classes of the blocks, in order."""
    caches = [kind(**fields) for kind, fields in zip(kinds, tree["caches"])]
    return State(caches=caches, **{k: v for k, v in tree.items() if k != "caches"})


# --- the schedule ---------------------------------------------------------------------------------

def _trace(model, stage: str, index: int, value) -> None:
    """Hand a value to the model's optional tracer (convert.parity records every stage)."""
    if model.tracer is not None and value is not None:
        model.tracer(stage, index, value)


def stream(tokens, state: State, window_size: int, run_window) -> tuple[list, State]:
    """Feed `tokens` [B, T] window piece by window piece through `run_window(piece, state)`.

    Returns the pieces' logits (to be joined by the caller) and the final State.
    """
    outs = []
    for start, stop in pieces(tokens.shape[1], state.offset, window_size):
        logits, state = run_window(tokens[:, start:stop], state)
        outs.append(logits)
    return outs, state


def window(model, tokens, state: State, passes: int, cat: Cat, last: bool = False):
    """Sleep if due, then wake over `tokens`, which all fall in the current window (`last`: the
    logits of the last token only)."""
    if state.due:
        state = sleep(model, state, state.due, cat)
    logits, state = wake(model, tokens, state, cat, last)
    if state.offset == model.config.window:
        state = dataclasses.replace(state, due=passes)
    return logits, state


def wake(model, tokens, state: State, cat: Cat, last: bool = False):
    """Embed `tokens`, run every block once, keep the hidden states at the end of the looped range.

    Returns (logits [B, t, V], or [B, 1, V] of the last token with `last`, new State)."""
    b = model.config.loop_range[1]
    caches, hidden = list(state.caches), state.hidden
    h = model.embed(tokens)  # (B, t, d)
    _trace(model, "embed", 0, h)
    for i, block in enumerate(model.layers):
        h, caches[i] = caches[i].wake(block, h, state.offset, cat)
        if i == b - 1:
            hidden = cat([hidden, h], 1)
        _trace(model, "block", i, h)
    t = tokens.shape[1]
    new = dataclasses.replace(state, caches=caches, hidden=hidden, offset=state.offset + t, seen=state.seen + t)
    return model.head(h[:, -1:] if last else h), new


def sleep_now(model, state: State, force: bool, passes, cat: Cat) -> State | None:
    """What the public `model.sleep(state, force, passes)` runs: the due sleep (with its own passes),
    else with force=True a sleep of the partial window; None when there is nothing to consolidate."""
    if state.due:
        return sleep(model, state, state.due, cat)
    if force and state.offset > 0:
        return sleep(model, state, check_passes(passes, model.config.sleep_passes), cat)
    return None


def sleep(model, state: State, passes: int, cat: Cat) -> State:
    """Consolidate the current window: passes 2..N and the coda (`sleep_plan`), then evict."""
    c = model.config
    carry = [cache.woken() for cache in state.caches]
    h = state.hidden  # pass 1's output at the end of the looped range
    for run in sleep_plan(len(state.caches), c.loop_range, passes):
        cache = state.caches[run.block]
        start = carry[run.block] if run.start == "carry" else cache.window_start()
        h, carry[run.block] = cache.replay(model.layers[run.block], h, start)
        _trace(model, run.stage, run.block, carry[run.block])
    keep = c.window - 1 if c.eviction == "sliding" else 0
    caches = [cache.evict(model.layers[i], carry[i], keep, cat) for i, cache in enumerate(state.caches)]
    return dataclasses.replace(state, caches=caches, hidden=state.hidden[:, :0], offset=0, due=0,
                               sleeps=state.sleeps + 1)
