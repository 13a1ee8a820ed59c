"""Measure one training step of a retrofitted folder on this machine: seconds and memory.

    python -m experiments.retrofit.measure runs/smol --task-arg window=64 --task-arg k=[1,2] \
        --batch 2 --passes 1 --passes 2 [--checkpoint-windows] [--json out.json]

Forward + backward of `batch` recall sequences with only the inserted SSM blocks trainable (what
`--freeze base` trains), then one AdamW step over them, timed after a warm-up step. Memory: peak
RSS of the process (ru_maxrss) minus the RSS after loading the model, i.e. activations, gradients
and optimizer state of the step (weights excluded). It is what the run sizing (experiments/retrofit)
and the GPU memory estimate (experiments/gpu) start from.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

from common.config import parse_override
from common.tasks import make


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def inserted_names(model) -> list[str]:
    """Parameters of the SSM blocks (the blocks a retrofit inserted)."""
    return [n for n, _ in model.named_parameters()
            if n.startswith("layers.") and model.layers[int(n.split(".")[1])].kind == "S"]


def measure(folder, task_args: dict, batch: int, passes: int, *, repeats: int = 2, checkpoint_windows=False,
            threads: int | None = None) -> dict:
    import torch

    import sleep_torch
    from sleep_torch.train import masked_loss

    if threads:
        torch.set_num_threads(threads)
    model = sleep_torch.load(folder)
    keep = set(inserted_names(model))
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
    model.checkpoint_windows = checkpoint_windows
    task = make("recall", tokenizer_dir=str(folder), **task_args)
    b = task.sample(batch, 0)
    tokens, mask = torch.from_numpy(b.tokens).long(), torch.from_numpy(b.loss_mask)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    base = rss_mib()
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        s, count = masked_loss(model(tokens, passes), tokens, mask)
        (s / count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    steady = sorted(times[1:])[len(times[1:]) // 2]
    return {"folder": str(folder), "task_args": task_args, "seq_len": task.seq_len, "batch": batch, "passes": passes,
            "checkpoint_windows": checkpoint_windows, "threads": torch.get_num_threads(),
            "s_per_step": steady, "s_per_sequence": steady / batch, "times": times,
            "params": sum(p.numel() for p in model.parameters()), "trained_params": sum(
                p.numel() for p in model.parameters() if p.requires_grad),
            "weights_rss_mib": base, "step_peak_extra_mib": max(0.0, peak_mib() - base)}


def main(args=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.retrofit.measure", description=__doc__.split("\n")[0])
    p.add_argument("folder")
    p.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--passes", type=int, action="append", default=[])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--checkpoint-windows", action="store_true")
    p.add_argument("--json")
    a = p.parse_args(args)
    task_args = dict(parse_override(s) for s in a.task_arg)
    rows = []
    for n in a.passes or [1]:  # each N in a fresh process gives a clean peak; here: sequential, peak is cumulative
        rows.append(measure(a.folder, task_args, a.batch, n, repeats=a.repeats,
                            checkpoint_windows=a.checkpoint_windows))
        print(json.dumps({k: rows[-1][k] for k in ("seq_len", "batch", "passes", "s_per_step", "s_per_sequence",
                                                   "weights_rss_mib", "step_peak_extra_mib")}), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
