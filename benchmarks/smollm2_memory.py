"""Peak memory of a long conversation: the retrofitted SmolLM2-135M-Instruct (lm-sleep, torch) against
transformers with its KV cache, each streaming T tokens of text in its own process.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.smollm2_memory [--folder runs/smol] [--tokens 1024 8192]

For every T and contender a fresh process loads the model, streams T tokens in pieces of 256 (lm-sleep:
`step` on one State, sleeping whenever a window fills; transformers: forward calls that carry a
DynamicCache, as a chat would) and reports its RSS right after loading, the peak RSS while streaming
(VmHWM, reset after loading through /proc/self/clear_refs, so loading's own peak is not counted), and
what it keeps between turns (lm-sleep: the State's bytes; transformers: the cache's tensors). float32,
one thread, no gradients. Frameworks under comparison are imported here only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PIECE = 256
TEXT = ("The river keeps flowing past the old mill while the quick brown fox jumps over the lazy dog, "
        "and the miller counts sacks of flour by the light of a lamp. ")


def _status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, MiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS


def child(contender: str, folder: str, n: int) -> dict:
    import torch

    import sleep_torch
    from common.tasks.recall import load_tokenizer
    from convert.sources import bundled_path

    torch.set_num_threads(1)
    tok = load_tokenizer("smollm2_memory", None, folder)
    ids = tok.encode(TEXT * (n // 20 + 1))[:n]
    if contender == "transformers":
        import transformers

        gguf = bundled_path("smollm2-135m-instruct")
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                                  dtype=torch.float32).eval()
        loaded, t0 = _status_mib("VmRSS"), time.perf_counter()
        _reset_peak()
        cache = transformers.DynamicCache()
        with torch.no_grad():
            for i in range(0, n, PIECE):
                out = model(torch.tensor([ids[i:i + PIECE]]), past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache = out.past_key_values
        kept = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
    else:
        model = sleep_torch.load(folder).for_inference()
        loaded, t0 = _status_mib("VmRSS"), time.perf_counter()
        _reset_peak()
        state = model.new_state(1)
        with torch.no_grad():
            for i in range(0, n, PIECE):
                model.step(torch.tensor([ids[i:i + PIECE]]), state, last=True)
        kept = state.nbytes()
    return {"contender": contender, "tokens": n, "seconds": time.perf_counter() - t0, "rss_loaded_mib": loaded,
            "peak_rss_mib": _status_mib("VmHWM"), "kept_mib": kept / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", default="runs/smol", help="retrofitted folder (made when missing)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--child", nargs=2, metavar=("CONTENDER", "TOKENS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.folder, int(args.child[1]))))
        return
    if not (Path(args.folder) / "config.json").is_file():
        from convert.retrofit import retrofit

        retrofit("smollm2-135m-instruct", args.folder, window=256, passes=2)
    rows = []
    for n in args.tokens:
        for contender in ("lm-sleep", "transformers"):
            out = subprocess.run([sys.executable, "-m", "benchmarks.smollm2_memory", "--folder", args.folder,
                                  "--child", contender, str(n)], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr)
    print(f"SmolLM2-135M-Instruct float32, 1 thread, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, pieces of {PIECE} tokens")
    print("| tokens | contender | kept between turns MiB | RSS after load MiB | peak RSS MiB | peak - load MiB | seconds |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tokens']:,} | {r['contender']} | {r['kept_mib']:.1f} | {r['rss_loaded_mib']:.0f} | "
              f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - r['rss_loaded_mib']:.0f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
