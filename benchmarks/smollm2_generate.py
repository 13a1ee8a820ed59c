"""Greedy generation speed of the retrofitted bundled SmolLM2-135M-Instruct vs transformers, same run.

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.smollm2_generate [--folder runs/smol] [--tokens 64]

Both run float32 torch on this machine with the same thread count: lm-sleep's `generate` on the
retrofitted folder (retrofitted here first when --folder is missing) and transformers' `generate`
on its own GGUF load of the same file (do_sample=False, no cache eviction). Prefill = the chat-
templated prompt in one call; decode = the following greedy tokens one at a time. Prints a table
and whether both produced the same tokens. transformers is a dev-only oracle: imported here only.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

QUESTION = "What is the capital of France? Answer in one sentence, then name two famous museums there."


def ours(folder: Path, prompt_ids: list[int], n: int) -> tuple[float, float, list[int]]:
    import sleep_torch
    from common.sampling import SamplingParams, sample_next

    model = sleep_torch.load(folder).eval()
    params, rng = SamplingParams(0.0, 0, 1.0), np.random.default_rng(0)
    state = model.new_state(1)
    with torch.no_grad():
        t0 = time.perf_counter()
        logits, _ = model.step(torch.tensor([prompt_ids]), state)
        prefill = time.perf_counter() - t0
        out, t1 = [], time.perf_counter()
        for _ in range(n):
            token = int(sample_next(logits[:, -1].float().numpy(), params, rng)[0])
            out.append(token)
            logits, _ = model.step(torch.tensor([[token]]), state)
        decode = time.perf_counter() - t1
    return prefill, decode, out


def theirs(gguf: Path, prompt_ids: list[int], n: int) -> tuple[float, float, list[int]]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                              dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        t0 = time.perf_counter()
        model(ids)  # prefill alone
        prefill = time.perf_counter() - t0
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        total = time.perf_counter() - t1
    return prefill, total - prefill, out[0, len(prompt_ids):].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", default="runs/smol", help="retrofitted folder (made when missing)")
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens after the prompt")
    args = ap.parse_args()
    from common.chat_template import ChatTemplate
    from convert.retrofit import retrofit
    from convert.sources import bundled_path

    gguf, folder = bundled_path("smollm2-135m-instruct"), Path(args.folder)
    if not (folder / "config.json").is_file():
        retrofit("smollm2-135m-instruct", folder, window=256, passes=2)
    import sleep_torch

    tok = sleep_torch.load(folder).tokenizer
    template = ChatTemplate((folder / "chat_template.jinja").read_text(), **tok.special_tokens())
    prompt = tok.encode(template.render([{"role": "user", "content": QUESTION}], add_generation_prompt=True))
    threads = torch.get_num_threads()
    rows = []
    for name, fn, src in (("lm-sleep generate (torch)", ours, folder), ("transformers generate", theirs, gguf)):
        prefill, decode, out = fn(src, prompt, args.tokens)
        rows.append((name, len(prompt) / prefill, args.tokens / decode, out))
    print(f"SmolLM2-135M-Instruct float32, prompt {len(prompt)} tokens, {args.tokens} greedy tokens, "
          f"torch threads {threads}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"| {'':28s} | prefill tokens/s | decode tokens/s |")
    for name, pre, dec, _ in rows:
        print(f"| {name:28s} | {pre:16.1f} | {dec:15.1f} |")
    print(f"ratio (ours / transformers): prefill {rows[0][1] / rows[1][1]:.2f}, decode {rows[0][2] / rows[1][2]:.2f}")
    # transformers' min_new_tokens masks the end-of-turn token, so compare up to the first one
    stops = set(tok.stop_ids)
    cut = next((i + 1 for i, t in enumerate(rows[0][3]) if t in stops), len(rows[0][3]))
    same = rows[0][3][:cut] == rows[1][3][:cut]
    print(f"same greedy reply (to the end-of-turn token, {cut} tokens): {same}")
    print("reply:", repr(tok.decode(rows[0][3][:cut])))


if __name__ == "__main__":
    main()
