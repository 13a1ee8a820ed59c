"""`lmsleep bench decode`: per-token latency and memory while streaming long contexts through `step`.

Two models of the same width and depth (default: the small-rule110 preset with a byte vocabulary of
258, window L = 64, N = 2, batch 1, float32, no gradients):
- sleep: the hybrid (A,S,A,S), hard eviction; a sleep fires after every window of L tokens;
- baseline: the same HybridLM with pattern "A" (all attention), eviction "sliding" and a window
  longer than the longest context, so nothing is ever evicted: a plain transformer whose KV cache
  grows with the context (HybridLM's cache concatenates and re-rotates its cached keys every step).

What is measured, for each context c: the `measure` single-token `step` calls that end the stream
at c (tokens c-measure+1 .. c), each timed on its own. How the stream gets to c - measure:
- "tokens": one token per `step` call all the way (every step is timed; the default for the sleep
  model in the full run);
- "chunks": `step` with chunks of `chunk` tokens (the sleep model: one window per call, so every
  window still sleeps at the start of the next call; the baseline: 1024 tokens per call).
Then an interleaved replay: the State reached at each context is saved (a shallow copy: the model's
internals are pure, so it stays valid), and `rounds` times, round-robin over the contexts, one window of
L single-token steps is replayed from a copy of each saved State. Every context is then timed under the
same machine conditions, which this shared 2-core VM needs (it drifts by tens of percent over minutes);
the latency targets use the replayed p50, the in-stream numbers are reported beside it.
A single-token step that starts with a due sleep (state.due > 0 before the call) is a *sleep step*:
its time includes the N-pass sleep of the previous window. Latency p50/p90 are over the other
(wake-only) steps; sleep steps are reported separately, and `mean_ms` averages all steps.
Memory: State.nbytes (peak over the measured steps; a window's keys and hidden states fill up
within the window), the attention keys/values alone, and the process RSS (/proc/self/statm) after
the measured steps. The sleep model streams first, so the baseline's growth does not inflate its RSS.
"""

from __future__ import annotations

import copy
import time

import numpy as np

from common.config import ModelConfig
from common.sleep import AttentionCache
from lmsleep import plots
from lmsleep.bench import common as bc

FULL = dict(contexts=(1024, 4096, 16384, 65536), measure=256, stream="tokens", rounds=8)
QUICK = dict(contexts=(1024, 4096), measure=128, stream="chunks", rounds=4)
BASELINE_CHUNK = 1024  # tokens per prefill call of the baseline (its attention grows with the context)
LATENCY_RATIO = 1.2  # target: sleep model's wake-step latency at the longest context <= 1.2 x at the shortest
MEMORY_DRIFT = 0.05  # target: its peak State memory within 5%


def model_configs(preset: str = "small-rule110", *, vocab_size: int = 258, window: int = 64, passes: int = 2,
                  max_context: int = 65536) -> tuple[ModelConfig, ModelConfig]:
    """(sleep model, baseline): the baseline is all attention with a window no stream here fills
    (the longest context plus the replay's window)."""
    sleep = ModelConfig.from_name(preset, vocab_size=vocab_size, window=window, sleep_passes=passes)
    base = sleep.replace(pattern="A", eviction="sliding", window=max_context + window + 1, sleep_passes=1)
    return sleep, base


def kv_bytes(state) -> int:
    """Bytes of the attention blocks' cached keys/values in a State (the tokens held, not the free room)."""
    return sum(t.nbytes for c in state.caches if isinstance(c, AttentionCache) for t in c.named().values())


def stream(rt: bc.Runtime, model, contexts, *, measure: int, mode: str, chunk: int, replay: tuple[int, int],
           seed: int = 0, progress=None, name: str = "") -> tuple[list[dict], dict]:
    """Stream one batch-1 token stream through `model.step`; one row per context (see module doc)."""
    rng = np.random.default_rng(seed)
    steps, rounds = replay
    tokens = rng.integers(0, model.config.vocab_size, (1, max(contexts) + steps), dtype=np.int64)
    state = model.new_state(1)
    # Timings go into arrays allocated up front: a Python list of 64k tuples would itself grow the RSS.
    times, dues = np.full(len(tokens[0]), np.nan), np.zeros(len(tokens[0]), bool)  # per stream position
    rows, snapshots = [], []
    rss0 = bc.rss_bytes()

    def one_token():
        i = state.seen
        dues[i] = state.due > 0
        tok = rt.array(tokens[:, i:i + 1])
        t0 = time.perf_counter()
        logits, _ = model.step(tok, state)
        rt.sync(logits)
        times[i] = time.perf_counter() - t0

    with rt.no_grad():
        _warm_up(rt, model, tokens)
        for c in contexts:
            start = c - measure
            if start < state.seen:
                raise ValueError(f"context {c}: {measure} measured steps need every context at least {measure} tokens "
                                 "after the previous one (the first at least that long)")
            while state.seen < start:
                if mode == "tokens":
                    one_token()
                    continue
                # chunks: fill the current window exactly (one sleep per window), never past `start`
                n = min(chunk - state.offset % chunk, start - state.seen)
                logits, _ = model.step(rt.array(tokens[:, state.seen:state.seen + n]), state)
                rt.sync(logits)
            nbytes, kv = [], []
            for _ in range(measure):
                one_token()
                nbytes.append(state.nbytes())
                kv.append(kv_bytes(state))
            rows.append({"model": name, "context": c, **_latency(times[start:c], dues[start:c]),
                         "state_bytes_peak": max(nbytes), "state_bytes_min": min(nbytes), "kv_bytes_peak": max(kv),
                         "rss_bytes": bc.rss_bytes(), "rss_growth_bytes": bc.rss_bytes() - rss0,
                         "sleeps": state.sleeps, "seen": state.seen})
            snapshots.append(copy.copy(state))  # internals are pure: later steps never touch its tensors
            if progress:
                r = rows[-1]
                progress(f"decode {name:8s} context {c:6d}: {r['p50_ms']:.2f} ms/token (p50), "
                         f"state {r['state_bytes_peak'] / 2**20:.2f} MiB")
        for row, (t, d) in zip(rows, _replay(rt, model, snapshots, tokens, steps, rounds)):
            r = _latency(t, d)
            row.update({"replay_p50_ms": r["p50_ms"], "replay_p90_ms": r["p90_ms"],
                        "replay_sleep_step_ms": r["sleep_step_ms"], "replay_steps": len(t)})
    timed = ~np.isnan(times)
    whole = {"model": name, "mode": mode, "steps_timed": int(timed.sum()), **_latency(times[timed], dues[timed]),
             "segments": _segments(times, dues)}
    return rows, whole


def _replay(rt: bc.Runtime, model, snapshots, tokens, steps: int, rounds: int):
    """Interleaved replay: `rounds` times round-robin over the contexts, `steps` single-token steps from a
    copy of the State saved at each context, so that every context is timed under the same machine
    conditions (this shared 2-core VM drifts by tens of percent over minutes). [(times, dues)] per context."""
    out = [([], []) for _ in snapshots]
    for _ in range(rounds):
        for (times, dues), snap in zip(out, snapshots):
            state = copy.copy(snap)
            for i in range(snap.seen, snap.seen + steps):
                dues.append(state.due > 0)
                tok = rt.array(tokens[:, i:i + 1])
                t0 = time.perf_counter()
                logits, _ = model.step(tok, state)
                rt.sync(logits)
                times.append(time.perf_counter() - t0)
    return [(np.array(t), np.array(d, bool)) for t, d in out]


def _segments(times: np.ndarray, dues: np.ndarray, size: int = 1024) -> list[dict]:
    """Wake-step p50 per block of `size` stream positions that has timed steps (drift vs noise)."""
    out = []
    for a in range(0, len(times), size):
        t, d = times[a:a + size], dues[a:a + size]
        wake = t[~np.isnan(t) & ~d]
        if len(wake):
            out.append({"start": a, "steps": int(len(wake)), "p50_ms": float(np.median(wake)) * 1e3})
    return out


def _warm_up(rt: bc.Runtime, model, tokens) -> None:
    """A throwaway stream (a window, a sleep step, single tokens) so that first-call costs
    (allocator growth, MLX compilation) do not land in the first measured context."""
    state, L = model.new_state(1), min(model.config.window, 256)  # the baseline's window is the whole stream
    for piece in (tokens[:, :L], *(tokens[:, L + i:L + i + 1] for i in range(8))):
        logits, _ = model.step(rt.array(piece), state)
        rt.sync(logits)


def _latency(times: np.ndarray, dues: np.ndarray) -> dict:
    """Wake-step p50/p90, mean over all steps, and the sleep steps apart (times in seconds)."""
    wake, sleep = times[~dues], times[dues]
    out = {"p50_ms": float(np.median(wake)) * 1e3, "p90_ms": float(np.percentile(wake, 90)) * 1e3,
           "mean_ms": float(np.mean(times)) * 1e3, "sleep_steps": int(len(sleep)),
           "sleep_step_ms": float(np.median(sleep)) * 1e3 if len(sleep) else None}
    out["sleep_cost_ms"] = out["sleep_step_ms"] - out["p50_ms"] if len(sleep) else None
    return out


def run(backend: str = "auto", *, quick: bool = False, device: str = "auto", threads: int | None = None,
        contexts=None, measure=None, stream_mode: str | None = None, preset: str = "small-rule110", window: int = 64,
        passes: int = 2, vocab_size: int = 258, baseline: bool = True, rounds: int | None = None,
        progress=None) -> dict:
    rt = bc.runtime(backend, device, threads)
    plan = dict(QUICK if quick else FULL)
    contexts = tuple(sorted(contexts or plan["contexts"]))
    measure = measure or plan["measure"]
    mode = stream_mode or plan["stream"]
    replay = (window, rounds or plan["rounds"])  # one window per round: one sleep step + L-1 wake steps
    if mode not in ("tokens", "chunks"):
        raise ValueError(f"stream mode must be 'tokens' or 'chunks', got {mode!r}")
    sleep_cfg, base_cfg = model_configs(preset, vocab_size=vocab_size, window=window, passes=passes,
                                        max_context=max(contexts))
    rows, streams = [], []
    r, w = stream(rt, rt.model(sleep_cfg), contexts, measure=measure, mode=mode, chunk=window, replay=replay,
                  progress=progress, name="sleep")
    rows += r
    streams.append(w)
    if baseline:  # the baseline always prefills in chunks: token by token to 64k would take an hour here
        r, w = stream(rt, rt.model(base_cfg), contexts, measure=measure, mode="chunks", chunk=BASELINE_CHUNK,
                      replay=replay, progress=progress, name="baseline")
        rows += r
        streams.append(w)
    settings = {"sleep_model": sleep_cfg.to_dict(), "baseline_model": base_cfg.to_dict(), "batch": 1,
                "contexts": list(contexts), "measure_steps": measure, "sleep_stream": mode,
                "baseline_stream": "chunks", "baseline_chunk": BASELINE_CHUNK, "preset": preset,
                "replay_steps_per_round": replay[0], "replay_rounds": replay[1]}
    return bc.document("decode", rt, quick, settings, rows, _targets(rows), streams=streams,
                       growth=_growth(rows))


def _growth(rows: list[dict]) -> dict:
    """Longest / shortest context ratios of latency (in-stream and replayed) and memory, per model."""
    out = {}
    for name in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == name]
        a, b = mine[0], mine[-1]
        out[name] = {"contexts": [a["context"], b["context"]], "p50_ratio": b["p50_ms"] / a["p50_ms"],
                     "p90_ratio": b["p90_ms"] / a["p90_ms"],
                     "replay_p50_ratio": b["replay_p50_ms"] / a["replay_p50_ms"],
                     "state_ratio": b["state_bytes_peak"] / a["state_bytes_peak"]}
    return out


def _targets(rows: list[dict]) -> list[dict]:
    mine = [r for r in rows if r["model"] == "sleep"]
    a, b = mine[0], mine[-1]
    span = f"{b['context']} vs {a['context']} tokens"
    return [bc.target(f"sleep model wake-step latency p50 (interleaved replay), {span}",
                      b["replay_p50_ms"] / a["replay_p50_ms"], LATENCY_RATIO, unit="x"),
            bc.target(f"sleep model peak State memory change, {span}",
                      abs(b["state_bytes_peak"] / a["state_bytes_peak"] - 1), MEMORY_DRIFT)]


COLUMNS = [("model", "model", "s"), ("context", "context", ",d"), ("p50 ms", "p50_ms", ".2f"),
           ("p90 ms", "p90_ms", ".2f"), ("replay p50", "replay_p50_ms", ".2f"), ("replay p90", "replay_p90_ms", ".2f"),
           ("mean ms", "mean_ms", ".2f"), ("sleep steps", "sleep_steps", "d"),
           ("sleep step ms", "sleep_step_ms", ".2f"), ("State MiB", "state_mib", ".3f"), ("KV MiB", "kv_mib", ".3f"),
           ("RSS MiB", "rss_mib", ".0f")]


def table(doc: dict) -> str:
    rows = [{**r, "state_mib": r["state_bytes_peak"] / 2**20, "kv_mib": r["kv_bytes_peak"] / 2**20,
             "rss_mib": r["rss_bytes"] / 2**20} for r in doc["rows"]]
    text = bc.format_table(rows, COLUMNS)
    for name, g in doc["growth"].items():
        text += (f"\n{name}: {g['contexts'][1]} vs {g['contexts'][0]} tokens: latency p50 x{g['p50_ratio']:.2f} "
                 f"(replayed x{g['replay_p50_ratio']:.2f}), p90 x{g['p90_ratio']:.2f}, "
                 f"State memory x{g['state_ratio']:.2f}")
    return text


def plot(doc: dict, path):
    plt = plots.pyplot()
    if plt is None:
        return None
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4))
    for name in sorted({r["model"] for r in doc["rows"]}):
        rows = [r for r in doc["rows"] if r["model"] == name]
        xs = [r["context"] for r in rows]
        ax1.plot(xs, [r["p50_ms"] for r in rows], marker="o", label=f"{name} p50")
        ax1.plot(xs, [r["p90_ms"] for r in rows], "--", marker=".", label=f"{name} p90")
        ax1.plot(xs, [r["replay_p50_ms"] for r in rows], ":", marker="x", label=f"{name} p50 (replay)")
        ax2.plot(xs, [r["state_bytes_peak"] / 2**20 for r in rows], marker="o", label=f"{name} State")
    ax1.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per token",
            title=f"decode latency ({doc['backend']}, batch 1)")
    ax2.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="MiB", title="State memory")
    for ax in (ax1, ax2):
        plots.log_ticks(ax.xaxis, doc["settings"]["contexts"])
    for w in doc["streams"]:  # wake-step p50 along the whole stream, per block of 1024 positions
        seg = w.get("segments", [])
        ax3.plot([x["start"] for x in seg], [x["p50_ms"] for x in seg], marker=".", label=f"{w['model']} ({w['mode']})")
    ax3.set(yscale="log", xlabel="stream position (tokens)", ylabel="ms per token (p50 per 1024)",
            title="latency along the stream (timed steps)")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return plots.save(fig, path)
