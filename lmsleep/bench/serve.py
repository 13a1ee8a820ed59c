"""`lmsleep bench serve`: the OpenAI-compatible server (lmsleep/server.py) under load, from a client's side.

The server runs in this process on 127.0.0.1 (port 0: any free port) in a daemon thread; clients are
threads speaking plain HTTP (urllib) to it, each one multi-turn conversation sent as streamed chat
completions (`"stream": true, "stream_options": {"include_usage": true}`), every turn resending the
whole conversation as OpenAI clients do. Per request:

    TTFT      = first content delta - request sent        (what a user waits for)
    tokens/s  = usage.completion_tokens of all requests / wall time of the whole level (aggregate)
    cached    = usage.prompt_tokens_details.cached_tokens (prompt tokens the server did not run again)

Levels: 1, 4 and 16 conversations at once. The flat-cost check: TTFT of turn 1, turn 2 and the last turn
of the 1-conversation level (a conversation held as a State should not get slower to answer as it grows).
The target compares the last turn with turn 2, which feeds as much (the previous reply + a new line);
turn 1 feeds only its line.
Default model: a debug-preset HybridLM with the byte tokenizer (no chat template: a turn is the user's
line), random weights, saved to a temporary folder - the server's cost, not a model's quality.
Everything is bounded (turns, max_tokens, a timeout per request); the server is closed at the end.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from common.config import ModelConfig
from common.tokenizers import ByteTokenizer
from lmsleep.bench import common as bc

FULL = dict(levels=(1, 4, 16), turns=10, max_tokens=32, d_model=128, n_layers=4, window=64)
QUICK = dict(levels=(1, 4), turns=3, max_tokens=4, d_model=32, n_layers=2, window=16)
REQUEST_TIMEOUT_S = 120  # per request; a stuck server fails the bench instead of hanging it
TARGET_TTFT_GROWTH = 1.5  # TTFT of the last turn / turn 1 (1 conversation) at most this


def build_model(rt: bc.Runtime, folder: Path, plan: dict) -> Path:
    """A random debug-preset model with the byte tokenizer, saved where open_engine can load it."""
    tok = ByteTokenizer()
    cfg = ModelConfig.from_name("debug", vocab_size=tok.vocab_size, d_model=plan["d_model"],
                                n_layers=plan["n_layers"], window=plan["window"], sleep_passes=2)
    rt.entry.module("io").save(rt.pkg.HybridLM(cfg, seed=0), folder, tokenizer=tok.to_dict())
    return folder


def user_line(conv: int, turn: int) -> str:
    return f"conversation {conv}, turn {turn}: tell me what comes next, in a few words."


def stream_chat(url: str, messages: list[dict], max_tokens: int, seed: int) -> dict:
    """One streamed chat completion: its reply text, TTFT, total time and usage."""
    body = json.dumps({"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 1.0,
                       "seed": seed, "stream": True, "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(url + "/chat/completions", data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first, pieces, usage = None, [], None
    with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
        for raw in resp:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"server error mid-stream: {event['error']['message']}")
            usage = event.get("usage") or usage
            for choice in event.get("choices", []):
                text = choice["delta"].get("content")
                if text:
                    first = first or time.perf_counter()
                    pieces.append(text)
    end = time.perf_counter()
    usage = usage or {}
    return {"text": "".join(pieces), "ttft_s": (first or end) - t0, "total_s": end - t0,
            "completion_tokens": usage.get("completion_tokens", 0), "prompt_tokens": usage.get("prompt_tokens", 0),
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)}


def conversation(url: str, conv: int, turns: int, max_tokens: int) -> list[dict]:
    """One client: `turns` turns, each resending the whole conversation with the reply it got."""
    messages, records = [], []
    for k in range(1, turns + 1):
        messages.append({"role": "user", "content": user_line(conv, k)})
        r = stream_chat(url, messages, max_tokens, seed=1000 * conv + k)
        messages.append({"role": "assistant", "content": r.pop("text")})
        records.append({"conversation": conv, "turn": k, **r})
    return records


def run_level(url: str, clients: int, turns: int, max_tokens: int) -> tuple[dict, list[dict]]:
    """`clients` conversations at once (threads); the level's row and every request's record."""
    results, errors = [None] * clients, []

    def client(i):
        try:
            results[i] = conversation(url, i, turns, max_tokens)
        except Exception as e:  # reported after the join: a failed client must not pass silently
            errors.append(f"conversation {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_TIMEOUT_S * turns)
    wall = time.perf_counter() - t0
    if errors or any(r is None for r in results):
        raise RuntimeError(f"{clients} conversations: " + ("; ".join(errors) or "a client did not finish"))
    records = [r for rs in results for r in rs]
    ttft = [r["ttft_s"] for r in records]
    tokens = sum(r["completion_tokens"] for r in records)
    first = [r["ttft_s"] for r in records if r["turn"] == 1]
    second = [r["ttft_s"] for r in records if r["turn"] == min(2, turns)]
    last = [r["ttft_s"] for r in records if r["turn"] == turns]
    row = {"concurrency": clients, "turns": turns, "requests": len(records), "wall_s": wall,
           "completion_tokens": tokens, "tokens_per_s": tokens / wall,
           "tokens_per_s_per_conversation": tokens / wall / clients,
           "ttft_p50_ms": 1e3 * statistics.median(ttft), "ttft_p90_ms": 1e3 * bc.summarize(ttft)["p90_s"],
           "ttft_turn1_ms": 1e3 * statistics.median(first),
           "ttft_turn2_ms": 1e3 * statistics.median(second), "ttft_last_ms": 1e3 * statistics.median(last),
           "prompt_tokens": sum(r["prompt_tokens"] for r in records),
           "cached_tokens": sum(r["cached_tokens"] for r in records)}
    return row, records


def run(backend: str = "auto", *, quick: bool = False, model_dir=None, levels=None, turns: int | None = None,
        max_tokens: int | None = None, parallel: int = 2, threads: int | None = None, progress=None) -> dict:
    from lmsleep.server import make_server

    rt = bc.runtime(backend, "auto", threads)  # the device the server's loader picks too
    plan = dict(QUICK if quick else FULL)
    for key, value in (("levels", tuple(levels) if levels else None), ("turns", turns), ("max_tokens", max_tokens)):
        if value:
            plan[key] = value
    with tempfile.TemporaryDirectory(prefix="lmsleep-bench-serve-") as tmp:
        folder = Path(model_dir) if model_dir else build_model(rt, Path(tmp) / "model", plan)
        server = make_server(folder, host="127.0.0.1", port=0, backend=rt.backend, sessions_dir=None, model_id="bench",
                             max_sessions=2 * max(plan["levels"]), parallel=parallel, queue=4 * max(plan["levels"]),
                             max_tokens=plan["max_tokens"])
        serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        serving.start()
        rows, requests = [], []
        try:
            stream_chat(server.url, [{"role": "user", "content": "warm up"}], 2, seed=0)  # first-call costs
            for clients in plan["levels"]:
                row, records = run_level(server.url, clients, plan["turns"], plan["max_tokens"])
                rows.append(row)
                requests += [{"concurrency": clients, **r} for r in records]
                if progress:
                    progress(f"serve {clients} conversations x {plan['turns']} turns: {row['tokens_per_s']:.0f} "
                             f"tokens/s, TTFT p50 {row['ttft_p50_ms']:.0f} ms")
        finally:
            server.close()
            serving.join(timeout=30)
    one = rows[0]
    growth = one["ttft_last_ms"] / one["ttft_turn2_ms"]
    settings = {**plan, "levels": list(plan["levels"]), "parallel": parallel, "model": str(model_dir or "debug, "
                f"byte tokenizer, d_model {plan['d_model']}, {plan['n_layers']} layers, window {plan['window']}, "
                "random weights"), "sampling": "temperature 1, a seed per request", "host": "127.0.0.1"}
    targets = [bc.target(f"TTFT of turn {plan['turns']} / turn 2 ({one['concurrency']} conversation)", growth,
                         TARGET_TTFT_GROWTH)]
    return bc.document("serve", rt, quick, settings, rows, targets, requests=requests,
                       flat_cost={"concurrency": one["concurrency"], "ttft_turn1_ms": one["ttft_turn1_ms"],
                                  "ttft_turn2_ms": one["ttft_turn2_ms"], "ttft_last_ms": one["ttft_last_ms"], "ratio": growth})


COLUMNS = [("conversations", "concurrency", "d"), ("turns", "turns", "d"), ("requests", "requests", "d"),
           ("wall s", "wall_s", ".2f"), ("tokens/s", "tokens_per_s", ".1f"),
           ("per conv", "tokens_per_s_per_conversation", ".1f"), ("TTFT p50 ms", "ttft_p50_ms", ".1f"),
           ("TTFT p90 ms", "ttft_p90_ms", ".1f"), ("turn 1 ms", "ttft_turn1_ms", ".1f"), ("turn 2 ms", "ttft_turn2_ms", ".1f"),
           ("last turn ms", "ttft_last_ms", ".1f"), ("cached/prompt", "cached_share", ".2f")]


def table(doc: dict) -> str:
    rows = [{**r, "cached_share": r["cached_tokens"] / max(r["prompt_tokens"], 1)} for r in doc["rows"]]
    return bc.format_table(rows, COLUMNS)


def plot(doc: dict, path):
    plt = bc.pyplot()
    if plt is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    rows = doc["rows"]
    left.plot([r["concurrency"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o", label="tokens/s")
    left.set(xscale="log", xlabel="concurrent conversations", ylabel="tokens/s (all conversations)",
             title=f"server throughput ({doc['backend']})")
    left.set_xticks([r["concurrency"] for r in rows], [str(r["concurrency"]) for r in rows])
    for r in rows:
        per_turn = {}
        for q in doc["requests"]:
            if q["concurrency"] == r["concurrency"]:
                per_turn.setdefault(q["turn"], []).append(1e3 * q["ttft_s"])
        turns = sorted(per_turn)
        right.plot(turns, [statistics.median(per_turn[k]) for k in turns], marker="o",
                   label=f"{r['concurrency']} conversations")
    right.set(xlabel="turn", ylabel="TTFT median (ms)", title="time to first token vs turn")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    right.legend(fontsize=7)
    return bc.save_figure(fig, path)
