"""Greedy generation speed and memory of the retrofitted bundled SmolLM2-135M-Instruct vs transformers
(torch) and mlx-lm (MLX), side by side in one process.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.smollm2_generate [--folder runs/smol] [--tokens 32]
        [--rounds 3] [--mlx] [--llama-cpp] [--memory 1024]

Everything runs float32 on the CPU with the same thread count: lm-sleep's `generate` (torch) on the
retrofitted folder (retrofitted here first when --folder is missing) against transformers' `generate`
on its own GGUF load of the same file (do_sample=False, DynamicCache, no eviction); with --mlx also
lm-sleep's MLX backend against mlx-lm's `generate_step` on a Hugging Face folder that transformers
writes from the same GGUF load (save_pretrained into a temporary folder); with --llama-cpp also llama.cpp
(llama-cpp-python, benchmarks only: it compiles llama.cpp for ~15 min) on the Q4_1 file itself, a
reference with other (4-bit) weights, listed last and compared with nothing. The machine is shared, so
the contenders alternate within every round (A, B, A, B, ...) and the table reports the median over
rounds. Prefill = the chat-templated prompt up to the first generated token, as a user of `generate`
sees it; decode = the following greedy tokens one at a time.

--memory N streams N tokens of text through lm-sleep (torch) and reports the State's bytes (the
buffers as allocated, and the tokens they hold) beside what transformers' KV cache would hold at 1k,
8k and 32k tokens (2 x layers x kv_heads x head_dim x tokens x 4 bytes). The State stops growing after
the first window (tests/torch/test_model.py::test_state_memory_is_bounded), so the lm-sleep column
beyond N is the measured value at N. Peak RSS of this process is printed for reference (it holds every
model of the run). Frameworks under comparison are imported here only.
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

QUESTION = "What is the capital of France? Answer in one sentence, then name two famous museums there."


# --- contenders: each returns (prefill seconds, decode seconds for n-1 tokens, tokens) -----------------

def lmsleep_torch(model, prompt_ids: list[int], n: int):
    import torch
    from sleep_torch.generate import generate

    with torch.no_grad():
        t0 = time.perf_counter()
        it = generate(model, prompt_ids, max_tokens=n, temperature=0.0)
        out = [next(it)]
        t1 = time.perf_counter()
        out += list(it)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, out


def transformers_torch(model, prompt_ids: list[int], n: int):
    import torch

    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        t2 = time.perf_counter()
    prefill = t1 - t0
    return prefill, (t2 - t1) - prefill, out[0, len(prompt_ids):].tolist()


def lmsleep_mlx(model, prompt_ids: list[int], n: int):
    from sleep_mlx.generate import generate

    t0 = time.perf_counter()
    it = generate(model, prompt_ids, max_tokens=n, temperature=0.0)
    out = [next(it)]
    t1 = time.perf_counter()
    out += list(it)
    return t1 - t0, time.perf_counter() - t1, out


def mlxlm(model, prompt_ids: list[int], n: int):
    import importlib

    import mlx.core as mx

    gen = importlib.import_module("mlx_lm.generate")
    t0 = time.perf_counter()
    it = gen.generate_step(mx.array(prompt_ids), model, max_tokens=n, sampler=lambda x: mx.argmax(x, axis=-1))
    out = [int(next(it)[0])]
    t1 = time.perf_counter()
    out += [int(tok) for tok, _ in it]
    return t1 - t0, time.perf_counter() - t1, out


def llamacpp(llm, prompt_ids: list[int], n: int):
    """llama.cpp (llama-cpp-python) on the Q4_1 GGUF file itself: greedy (top_k = 1)."""
    t0 = time.perf_counter()
    it = llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True)
    out = [next(it)]
    t1 = time.perf_counter()
    out += [next(it) for _ in range(n - 1)]
    return t1 - t0, time.perf_counter() - t1, out


# --- the run -------------------------------------------------------------------------------------------

def compare(pairs, prompt, n: int, rounds: int) -> list[tuple[str, float, float, list[int]]]:
    """Alternate the contenders within each of `rounds` rounds (after one warm-up each); medians."""
    times = {name: ([], []) for name, _, _ in pairs}
    outs = {}
    for name, fn, model in pairs:  # warm-up: first-call allocations, mx.compile traces
        fn(model, prompt, 4)
    for _ in range(rounds):
        for name, fn, model in pairs:
            pre, dec, out = fn(model, prompt, n)
            times[name][0].append(pre)
            times[name][1].append(dec)
            outs[name] = out
    return [(name, len(prompt) / statistics.median(times[name][0]), (n - 1) / statistics.median(times[name][1]),
             outs[name]) for name, _, _ in pairs]


def print_table(rows, tok) -> None:
    print(f"| {'':30s} | prefill tokens/s | decode tokens/s |")
    print(f"|{'-' * 32}|-----------------:|----------------:|")
    for name, pre, dec, _ in rows:
        print(f"| {name:30s} | {pre:16.1f} | {dec:15.1f} |")
    for (a, pa, da, oa), (b, pb, db, ob) in zip(rows[::2], rows[1::2]):
        stops = set(tok.stop_ids)  # min_new_tokens masks the end-of-turn token: compare the tokens before it
        cut = next((i for i, t in enumerate(oa) if t in stops), len(oa))
        same = next((i for i, (x, y) in enumerate(zip(oa[:cut], ob[:cut])) if x != y), cut)
        print(f"ratio {a} / {b}: prefill {pa / pb:.2f}, decode {da / db:.2f}; the same greedy tokens for "
              f"{same} of the {cut} before the end of turn")


def memory_table(model, tok, n: int) -> None:
    import torch

    c = model.config
    text = " ".join(["The quick brown fox jumps over the lazy dog while the river keeps flowing."] * (n // 8))
    ids = tok.encode(text)[:n]
    state = model.new_state(1)
    with torch.no_grad():
        for i in range(0, len(ids), c.window):
            model.step(torch.tensor([ids[i:i + c.window]]), state)
    held = sum(t.nbytes for t in state.tensors()) - sum(
        (cache.k.shape[1] - cache.length) * cache.k[0, 0].nbytes * 2 * cache.k.shape[0]
        for cache in state.caches if hasattr(cache, "length"))
    attn = sum(kind == "A" for kind in c.layer_types)
    print(f"\nState after {len(ids)} tokens ({state.sleeps} sleeps): {state.nbytes() / 2**20:.2f} MiB allocated, "
          f"{held / 2**20:.2f} MiB held")
    print(f"| tokens | lm-sleep State MiB | transformers KV cache MiB (2 x {attn} x {c.kv_heads} x {c.head_dim} x T x 4) |")
    print("|-------:|-------------------:|------------------:|")
    for t in (1024, 8192, 32768):
        kv = 2 * attn * c.kv_heads * c.head_dim * t * 4
        print(f"| {t:6d} | {state.nbytes() / 2**20:18.2f} | {kv / 2**20:17.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", default="runs/smol", help="retrofitted folder (made when missing)")
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens after the prompt")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (median reported)")
    ap.add_argument("--mlx", action="store_true", help="also lm-sleep MLX vs mlx-lm (mlx[cpu])")
    ap.add_argument("--llama-cpp", action="store_true", help="also llama.cpp on the Q4_1 file (llama-cpp-python)")
    ap.add_argument("--memory", type=int, default=0, help="stream this many tokens for the memory table")
    args = ap.parse_args()
    import torch
    import transformers

    import sleep_torch
    from common.chat_template import ChatTemplate
    from convert.retrofit import retrofit
    from convert.sources import bundled_path

    gguf, folder = bundled_path("smollm2-135m-instruct"), Path(args.folder)
    if not (folder / "config.json").is_file():
        retrofit("smollm2-135m-instruct", folder, window=256, passes=2)
    ours = sleep_torch.load(folder).for_inference()
    tok = ours.tokenizer
    template = ChatTemplate((folder / "chat_template.jinja").read_text(), **tok.special_tokens())
    prompt = tok.encode(template.render([{"role": "user", "content": QUESTION}], add_generation_prompt=True))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                               dtype=torch.float32).eval()
    pairs = [("lm-sleep generate (torch)", lmsleep_torch, ours), ("transformers generate", transformers_torch, theirs)]
    if args.mlx:
        import importlib

        import sleep_mlx

        tmp = tempfile.TemporaryDirectory()
        # a GGUF-loaded model refuses save_pretrained: copy its weights into a plain one first
        config = theirs.config.__class__.from_dict({k: v for k, v in theirs.config.to_dict().items()
                                                    if k != "quantization_config"})
        plain = type(theirs)(config)
        plain.load_state_dict(theirs.state_dict())
        plain.save_pretrained(tmp.name)
        del plain
        transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp.name)
        mlx_model, _ = importlib.import_module("mlx_lm").load(tmp.name)
        pairs += [("lm-sleep generate (MLX)", lmsleep_mlx, sleep_mlx.load(folder).for_inference()),
                  ("mlx-lm generate_step", mlxlm, mlx_model)]
    if args.llama_cpp:  # a reference beside the pairs: other weights (4-bit), its own kernels
        from llama_cpp import Llama

        pairs += [("llama.cpp on the Q4_1 file", llamacpp,
                   Llama(model_path=str(gguf), n_threads=torch.get_num_threads(), n_threads_batch=torch.get_num_threads(),
                         n_ctx=512, n_batch=512, verbose=False))]
    rows = compare(pairs, prompt, args.tokens, args.rounds)
    print(f"SmolLM2-135M-Instruct float32 on CPU, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"prompt {len(prompt)} tokens, {args.tokens} greedy tokens, median of {args.rounds} alternating rounds, "
          f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print_table(rows, tok)
    if args.memory:
        memory_table(ours, tok, args.memory)
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
