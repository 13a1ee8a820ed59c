"""Conversations as States, for a server whose clients resend the whole conversation every turn.

An OpenAI-style client sends the full message list (or the full prompt) with each request. A sleeping
model holds the conversation in its State, so re-reading the history would throw away exactly what
makes it cheap. Instead, every finished reply leaves a *snapshot*: the State after the request's text
plus the reply, keyed by a hash of that text (its rendering, for chats). A new request looks for the
longest snapshot whose text is a prefix of its own, continues from a copy of that State and feeds only
the rest: turn k costs the new text plus any sleep that fell due, never the history.

    engine = open_engine("runs/smol", sessions_dir="sessions")
    with engine.chat([{"role": "user", "content": "hi"}], Sampling(max_tokens=50)) as turn:
        for piece in turn:
            print(piece, end="")
    turn.usage   # {"prompt_tokens": ..., "completion_tokens": ..., "prompt_tokens_details": {"cached_tokens": ...}}

What a snapshot holds (the same feeding as `lmsleep chat`, common/conversation.py): the text up to the
reply (a chat's rendering with the generation prompt) as encoded tokens, then the reply's tokens *as
generated* (the stop token is not fed: the template writes it again after the reply). Its key is the
hash of that text followed by the reply's decoded text, so the next request - whose rendering contains
the assistant message as the client echoes it - starts with the key's text exactly when the client sent
the reply back unchanged; otherwise (an edited reply, a template that trims it, a reply cut by a stop
string) the match falls back to an earlier snapshot and that turn is recomputed from there.

Snapshots live in RAM (at most `max_sessions` States: about one per active conversation, since a new
turn's snapshot pushes its parent out of RAM) and, with a sessions directory, as memory files
(`model.save_state`, atomic) under `DIR/<model hash>/`, written before the reply is finished: a
restarted server - or one killed with SIGKILL - continues from the last completed turn. The directory
has a size cap; least recently used snapshots go first. A sleep that falls due with a reply runs on a
background thread after it and is joined before that State is used again (SPEC section 3: same numbers).

Concurrency: up to `parallel` requests compute at once, `queue` more may wait, beyond that `Busy` (HTTP
429). Requests continuing the same snapshot (one conversation) run one after the other. Memory: the
model, up to `max_sessions` States in RAM and one working State per running request.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import re
import threading
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

MAX_STOP_STRINGS = 4
ROLES = ("system", "developer", "user", "assistant", "tool")


class ParamError(ValueError):
    """A request parameter is invalid; `param` names it (the OpenAI error object's `param`)."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


class Busy(RuntimeError):
    """Too many requests running and waiting (HTTP 429)."""


@dataclasses.dataclass
class Sampling:
    """How one reply is drawn; the fields mirror the OpenAI request's (top_k is an extension)."""

    max_tokens: int = 256  # tokens to generate at most (the stop token included)
    temperature: float = 1.0  # 0 = greedy; at most 2 as in the OpenAI API
    top_p: float = 1.0  # nucleus mass, in (0, 1]
    top_k: int = 0  # sample from the k most likely; 0 = all
    seed: int | None = None  # None: a fresh draw each request
    stop: tuple[str, ...] = ()  # up to 4 strings that end the reply (not included in it)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop or ())
        _int("max_tokens", self.max_tokens, lo=1)
        _number("temperature", self.temperature, 0.0, 2.0)
        _number("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _int("top_k", self.top_k, lo=0)
        if self.seed is not None:
            _int("seed", self.seed, lo=0, hi=2**63 - 1)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ParamError("stop", f"stop: at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ParamError("stop", "stop: a non-empty string or a list of non-empty strings")


def _int(name, value, lo=None, hi=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(name, f"{name}: expected an integer, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ParamError(name, f"{name}: {value} is not {bounds}")


def _number(name, value, lo, hi, lo_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ParamError(name, f"{name}: expected a number, got {value!r}")
    if value > hi or value < lo or (lo_open and value == lo):
        raise ParamError(name, f"{name}: {value} is not in {'(' if lo_open else '['}{lo}, {hi}]")


# --- what a request feeds: the rendering of its messages ------------------------------------------

def message_text(m, i: int) -> tuple[str, str]:
    """(role, content) of one OpenAI message; content parts of type "text" are joined."""
    if not isinstance(m, dict):
        raise ParamError("messages", f"messages[{i}]: expected an object with 'role' and 'content'")
    role, content = m.get("role"), m.get("content")
    if role not in ROLES:
        raise ParamError("messages", f"messages[{i}].role: {role!r} is not one of {', '.join(ROLES)}")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ParamError("messages", f"messages[{i}].content: only text parts are supported")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ParamError("messages", f"messages[{i}].content: expected a string, got {type(content).__name__}")
    return role, content


def render_chat(conversation, messages: Sequence) -> str:
    """The text a chat request stands for: the model's chat template over the messages, with the
    generation prompt (common.conversation's Conversation carries the template, or None)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ParamError("messages", "messages: expected a non-empty list")
    pairs = [message_text(m, i) for i, m in enumerate(messages)]
    if conversation.template is None:
        # no template (a task vocabulary): a message is its line, a reply is what was generated
        nl = "\n" if conversation.newline else ""
        return "".join(c if r == "assistant" else c + nl for r, c in pairs)
    msgs = [{"role": r, "content": c} for r, c in pairs]
    return conversation.template.render(msgs, add_generation_prompt=True, **conversation.special)


def _check_text(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ParamError(param, f"{param}: text is not valid Unicode (a lone surrogate)") from None


# --- snapshots ------------------------------------------------------------------------------------

_FILE = re.compile(r"^([0-9a-f]{64})\.(\d+)\.safetensors$")


def text_key(namespace: str, text: str) -> str:
    return _hasher(namespace, text).hexdigest()


def _hasher(namespace: str, text: str = ""):
    h = hashlib.sha256(namespace.encode() + b"\0")
    h.update(text.encode("utf-8", "surrogatepass"))
    return h


@dataclasses.dataclass(eq=False)
class Snapshot:
    """The State after `chars` characters of some request's text (plus its reply), known by their hash."""

    key: str
    chars: int
    state: object = None  # the State in RAM, or None (then on disk)
    path: Path | None = None
    nbytes: int = 0  # size on disk
    sleeper: threading.Thread | None = None  # the background sleep of `state`, if one was due

    def join(self) -> None:
        t = self.sleeper
        if t is not None:
            t.join()


class SnapshotStore:
    """Snapshots by key, least recently used first: States in RAM (capped) and memory files (capped)."""

    def __init__(self, model, directory=None, *, max_states: int = 16, max_bytes: int = 1 << 30,
                 no_grad=contextlib.nullcontext, log: Callable[[str], None] | None = None):
        if max_states < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_states}")
        self.model, self.no_grad, self.log = model, no_grad, log or (lambda msg: None)
        self.max_states, self.max_bytes = max_states, max_bytes
        self.entries: OrderedDict[str, Snapshot] = OrderedDict()
        self.lock = threading.Lock()
        self.dir = None
        if directory is not None:
            fp = model.fingerprint()  # remembered by the model: not re-hashed for every memory file
            self.dir = Path(directory) / fp[:16]
            self.dir.mkdir(parents=True, exist_ok=True)
            self._scan()

    def _scan(self) -> None:
        """Index the memory files a previous run left, oldest first."""
        found = []
        for p in self.dir.iterdir():
            m = _FILE.match(p.name)
            if m:
                with contextlib.suppress(OSError):
                    st = p.stat()
                    found.append((st.st_mtime, Snapshot(m[1], int(m[2]), path=p, nbytes=st.st_size)))
        for _, snap in sorted(found, key=lambda x: x[0]):
            self.entries[snap.key] = snap
        self._unlink(self._evict())

    def candidates(self, namespace: str, text: str) -> list[tuple[str, int]]:
        """(key, chars) of the snapshots whose text is a proper prefix of `text`, longest first."""
        with self.lock:
            lengths = sorted({s.chars for s in self.entries.values() if s.chars < len(text)})
        h, pos, found = _hasher(namespace), 0, []
        for n in lengths:  # one pass over the text, hashing each candidate prefix on the way
            h.update(text[pos:n].encode("utf-8", "surrogatepass"))
            pos = n
            found.append((h.hexdigest(), n))
        with self.lock:
            return [(k, n) for k, n in reversed(found) if k in self.entries]

    def take(self, key: str):
        """A State to continue from (a copy: the snapshot stays), or None if it is gone or unreadable."""
        with self.lock:
            snap = self.entries.get(key)
            if snap is None:
                return None
            self.entries.move_to_end(key)
        snap.join()  # a sleep still running on it finishes first
        state = snap.state
        if state is not None:
            return copy.deepcopy(state)
        try:
            return self.model.load_state(snap.path)
        except (OSError, ValueError) as e:  # deleted meanwhile, damaged, written by another model
            self.log(f"snapshot {snap.path.name} unusable ({str(e).splitlines()[0]}); dropped")
            self.drop(key)
            return None

    def put(self, key: str, chars: int, state, parent: str | None = None) -> None:
        """Keep `state` (the caller hands it over) as the snapshot `key`; on disk before this returns."""
        snap = Snapshot(key, chars, state)
        if self.dir is not None:
            path = self.dir / f"{key}.{chars}.safetensors"
            try:
                self.model.save_state(state, path)
                snap.path, snap.nbytes = path, path.stat().st_size
            except OSError as e:  # disk full, directory gone: keep it in RAM only, keep serving
                self.log(f"snapshot not written ({e}); kept in memory only")
        if state.due:  # a window filled during the reply: sleep now, while the user reads it
            snap.sleeper = threading.Thread(target=self._sleep, args=(snap, state), name="lmsleep-sleep",
                                            daemon=True)
            snap.sleeper.start()
        with self.lock:
            self.entries.pop(key, None)
            self.entries[key] = snap
            before = self.entries.get(parent) if parent else None
            if before is not None and before.path is not None:
                before.state = None  # the conversation moved on: its previous State stays on disk only
            victims = self._evict()
        self._unlink(victims)

    def _sleep(self, snap: Snapshot, state) -> None:
        try:
            with self.no_grad():
                self.model.sleep(state)
            if snap.path is not None:  # the file then holds the slept State: a restart need not sleep
                self.model.save_state(state, snap.path)
        except Exception:  # the snapshot as written stays valid (its sleep runs at its next step)
            self.log("background sleep failed:\n" + traceback.format_exc())

    def drop(self, key: str) -> None:
        with self.lock:
            snap = self.entries.pop(key, None)
        self._unlink([snap] if snap else [])

    def _evict(self) -> list[Snapshot]:
        """(under self.lock) Enforce the RAM and disk caps, oldest first; returns the snapshots removed."""
        victims = []
        in_ram = [s for s in self.entries.values() if s.state is not None]
        for s in in_ram[:max(0, len(in_ram) - self.max_states)]:
            if s.path is None:
                victims.append(self.entries.pop(s.key))
            else:
                s.state = None
        total = sum(s.nbytes for s in self.entries.values())
        while total > self.max_bytes and len(self.entries) > 1:  # the newest always stays
            _, s = self.entries.popitem(last=False)
            total -= s.nbytes
            victims.append(s)
        return victims

    def _unlink(self, victims) -> None:
        for s in victims:
            s.join()  # its sleep would otherwise write the file again
            if s.path is not None:
                with contextlib.suppress(FileNotFoundError):
                    s.path.unlink()

    def close(self) -> None:
        """Wait for the background sleeps (their memory files are then complete)."""
        with self.lock:
            snaps = list(self.entries.values())
        for s in snaps:
            s.join()

    def stats(self) -> dict:
        with self.lock:
            return {"snapshots": len(self.entries), "in_ram": sum(s.state is not None for s in self.entries.values()),
                    "disk_bytes": sum(s.nbytes for s in self.entries.values())}


# --- one request --------------------------------------------------------------------------------

class _Locks:
    """One lock per conversation key, created on demand and forgotten when nobody holds or waits."""

    def __init__(self):
        self.lock, self.locks = threading.Lock(), {}

    @contextlib.contextmanager
    def hold(self, key: str):
        with self.lock:
            entry = self.locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        entry[0].acquire()
        try:
            yield
        finally:
            entry[0].release()
            with self.lock:
                entry[1] -= 1
                if entry[1] == 0:
                    del self.locks[key]


class Turn:
    """One request's reply: iterate for its text pieces (streaming); `text`, `finish_reason`, `usage` after.

    Holds a compute slot and its conversation until iterated to the end or closed; use it as a context
    manager. Only a reply that ran to its end leaves a snapshot.
    """

    def __init__(self, engine: Engine, namespace: str, text: str, state, prompt_ids: list[int], sampling: Sampling,
                 parent: str | None, hold: contextlib.ExitStack):
        self.engine, self.namespace, self.request_text, self.state = engine, namespace, text, state
        self.prompt_ids, self.sampling, self.parent, self._hold = prompt_ids, sampling, parent, hold
        self.cached_tokens = state.seen  # tokens of the history not processed again
        self.text, self.finish_reason, self.completion_tokens = "", None, 0
        self.processed = 0  # tokens this request ran through the model (new prompt text + fed reply tokens)
        self._started = self._closed = False

    @property
    def usage(self) -> dict:
        prompt = self.cached_tokens + len(self.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def __iter__(self) -> Iterator[str]:
        assert not self._started, "a Turn is iterated once"
        self._started = True
        try:
            yield from self._generate()
        finally:  # finished, failed, or abandoned by its reader (a closed connection): let others in
            self.close()

    def _generate(self) -> Iterator[str]:
        e, s = self.engine, self.sampling
        stop_ids, stops = e.stop_ids, s.stop
        reply, shown, cut = _Detokenizer(e.tokenizer), 0, None
        gen = e.generate(e.model, self.prompt_ids, max_tokens=s.max_tokens, temperature=s.temperature,
                         top_k=s.top_k, top_p=s.top_p, seed=s.seed, stop=stop_ids, passes=e.passes, state=self.state)
        try:
            for token in gen:
                self.completion_tokens += 1
                if token in stop_ids:
                    self.finish_reason = "stop"
                    break
                before = len(reply.text)
                reply.add(token)
                cut = _find_stop(reply.text, stops, before)
                if cut is not None:  # a stop string: the reply ends before it
                    self.finish_reason = "stop"
                    break
                safe = len(reply.text) - _held_back(reply.text, stops)
                if safe > shown:
                    yield reply.text[shown:safe]
                    shown = safe
            else:
                self.finish_reason = "length"
        finally:
            gen.close()  # suspended after yielding: the token it yielded last is not fed
        if cut is None:
            reply.flush()  # a multi-byte character the reply ended in the middle of
            cut = _find_stop(reply.text, stops, len(reply.text) - len(reply.flushed))
        self.text = reply.text if cut is None else reply.text[:cut]
        if len(self.text) > shown:
            yield self.text[shown:]
        self._finish(len(reply.ids), cut is not None)

    def _finish(self, n_tokens: int, cut: bool) -> None:
        """Record the reply's State as a snapshot (the slot and the conversation are released by close)."""
        e = self.engine
        self.processed = self.state.seen - self.cached_tokens
        with e.lock:
            e.counters["tokens_processed"] += self.processed
            e.counters["completed"] += 1
        if not cut:  # a reply cut by a stop string is echoed back shorter than what the State read
            # every reply token was fed (the stop token, not part of the reply, is not)
            assert self.processed == len(self.prompt_ids) + n_tokens, (self.processed, n_tokens)
            consumed = self.request_text + self.text
            e.store.put(text_key(self.namespace, consumed), len(consumed), self.state, parent=self.parent)
        self.state = None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._hold.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def read(self) -> str:
        """The whole reply (non-streaming)."""
        for _ in self:
            pass
        return self.text


class _Detokenizer:
    """Text of a growing list of token ids without decoding them all at every token.

    Decodes only the ids after the last point where the text was whole (no cut multi-byte character),
    and takes what they add to the text of the few ids before it (decoders that treat a leading space
    specially need that context)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.text, self.flushed = tokenizer, [], "", ""
        self.prefix = self.read = 0  # ids[prefix:read]: the context; ids[read:]: not yet in text

    def add(self, token: int) -> None:
        self.ids.append(token)
        context = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) > len(context) and not text.endswith("\ufffd"):
            self.text += text[len(context):]
            self.prefix, self.read = self.read, len(self.ids)

    def flush(self) -> None:
        """Take in what is left (U+FFFD for a cut character)."""
        context = self.tokenizer.decode(self.ids[self.prefix:self.read])
        self.flushed = self.tokenizer.decode(self.ids[self.prefix:])[len(context):]
        self.text += self.flushed
        self.prefix = self.read = len(self.ids)


def _find_stop(text: str, stops: Sequence[str], new_from: int) -> int | None:
    """Where the first stop string in `text` starts, looking only where text from `new_from` on can complete one."""
    found = [i for i in (text.find(x, max(0, new_from - len(x) + 1)) for x in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` not to show yet: the start of a stop string."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


class Engine:
    """Requests against one model: match, continue, generate, snapshot (see the module docstring)."""

    def __init__(self, model, tokenizer, generate: Callable, *, conversation, stop_ids: Sequence[int],
                 store: SnapshotStore, no_grad=contextlib.nullcontext, passes: int | None = None,
                 parallel: int = 2, queue: int = 64, max_tokens_cap: int = 8192):
        if parallel < 1 or queue < 0:
            raise ValueError(f"parallel must be >= 1 and queue >= 0, got {parallel} and {queue}")
        self.model, self.tokenizer, self.generate, self.conversation = model, tokenizer, generate, conversation
        self.stop_ids, self.store, self.no_grad, self.passes = list(stop_ids), store, no_grad, passes
        self.parallel, self.queue, self.max_tokens_cap = parallel, queue, max_tokens_cap
        self.slots = threading.BoundedSemaphore(parallel)
        self.locks = _Locks()
        self.lock = threading.Lock()
        self.admitted = 0  # requests running or waiting
        self.counters = {"requests": 0, "completed": 0, "busy": 0, "tokens_processed": 0, "tokens_reused": 0,
                         "snapshot_hits": 0}

    # --- the two request kinds -------------------------------------------------------------------
    def chat(self, messages: Sequence, sampling: Sampling) -> Turn:
        """A chat request (OpenAI messages); blocks for a slot, returns the Turn ready to generate."""
        text = render_chat(self.conversation, messages)
        _check_text(text, "messages")
        return self._begin("chat", text, sampling)

    def complete(self, prompt: str, sampling: Sampling) -> Turn:
        """A raw completion of `prompt` (continued from a snapshot when one covers its start)."""
        if not isinstance(prompt, str) or not prompt:
            raise ParamError("prompt", "prompt: expected a non-empty string")
        _check_text(prompt, "prompt")
        return self._begin("text", prompt, sampling)

    # --- internals -------------------------------------------------------------------------------
    def _namespace(self, kind: str) -> str:
        # States made with different sleep passes differ: keep their snapshots apart
        return f"{kind}:passes={self.passes}"

    def _begin(self, kind: str, text: str, sampling: Sampling) -> Turn:
        if sampling.max_tokens > self.max_tokens_cap:
            raise ParamError("max_tokens", f"max_tokens: {sampling.max_tokens} is over this server's limit "
                                           f"{self.max_tokens_cap}")
        ns = self._namespace(kind)
        with contextlib.ExitStack() as hold:
            self._admit()
            hold.callback(self._leave)
            found = self.store.candidates(ns, text)
            hold.enter_context(self.locks.hold(found[0][0] if found else text_key(ns, text)))
            self.slots.acquire()
            hold.callback(self.slots.release)
            state, prompt_ids, parent = self._resume(ns, text)
            turn = Turn(self, ns, text, state, prompt_ids, sampling, parent, hold.pop_all())
        return turn

    def _admit(self) -> None:
        with self.lock:
            self.counters["requests"] += 1
            if self.admitted >= self.parallel + self.queue:
                self.counters["busy"] += 1
                raise Busy(f"server busy: {self.parallel} requests running and {self.queue} waiting; retry later")
            self.admitted += 1

    def _leave(self) -> None:
        with self.lock:
            self.admitted -= 1

    def _resume(self, ns: str, text: str):
        """(State, token ids still to feed, snapshot key continued from) for the longest usable prefix."""
        for key, chars in self.store.candidates(ns, text):  # again: a request ahead of us may have added one
            ids = self._encode(text[chars:])
            if not ids:
                continue
            state = self.store.take(key)
            if state is not None:
                with self.lock:
                    self.counters["snapshot_hits"] += 1
                    self.counters["tokens_reused"] += state.seen
                return state, ids, key
        ids = self._encode(text)
        if not ids:
            raise ParamError(None, "the request encodes to no tokens")
        return self.model.new_state(1), ids, None

    def _encode(self, text: str) -> list[int]:
        try:
            return list(self.tokenizer.encode(text))
        except ValueError as e:  # a task vocabulary without this character
            raise ParamError(None, f"cannot encode the request: {e}") from None

    def stats(self) -> dict:
        with self.lock:
            out = dict(self.counters, running_or_waiting=self.admitted)
        return out | self.store.stats()

    def close(self) -> None:
        self.store.close()


def open_engine(model_dir, *, backend: str = "auto", sessions_dir=None, max_sessions: int = 16,
                max_disk_bytes: int = 1 << 30, parallel: int = 2, queue: int = 64, passes: int | None = None,
                dtype: str | None = None, log: Callable[[str], None] | None = None) -> Engine:
    """Load a model folder (with its tokenizer and chat template) and build an Engine over it."""
    from lmsleep import workflows as wf

    b, model, tok = wf.load_for_generation(backend, model_dir, dtype)
    if hasattr(model, "eval"):
        model.eval()
    store = SnapshotStore(model, sessions_dir, max_states=max_sessions, max_bytes=max_disk_bytes,
                          no_grad=b.no_grad, log=log)
    return Engine(model, tok, b.generate, conversation=wf.conversation_for(model_dir, tok),
                  stop_ids=wf.stop_ids(tok), store=store, no_grad=b.no_grad, passes=passes,
                  parallel=parallel, queue=queue)


__all__ = ["Engine", "Turn", "Sampling", "SnapshotStore", "Snapshot", "Busy", "ParamError", "open_engine",
           "render_chat", "text_key"]
