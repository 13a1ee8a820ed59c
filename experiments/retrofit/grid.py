"""The CPU retrofit experiment (issue 15, deliverable 4): does sleep help a pretrained model recall what
hard eviction took away? Every step is an `lmsleep` command line.

1. `lmsleep retrofit smollm2-135m-instruct ROOT/retrofit --window 32`: the bundled SmolLM2-135M-Instruct
   GGUF, 8 MLP-free SSM blocks inserted in the looped middle (source layers [7, 23)), `ssm.o_proj` = 0.
2. `lmsleep train --init ROOT/retrofit --freeze base` on `recall` (facts 1-2 windows before their question,
   in SmolLM2's own tokens), once with N = 1 and once with N = 2: the same steps, the same data (a step's
   batch depends on (seed, step) only), the same init. Only the inserted SSM blocks learn.
3. `lmsleep sleep-eval`: per distance k, the whole-context upper bound (no eviction), the untrained retrofit
   (lower bound: an evicted fact is gone), and both trained folders at N = 1 and 2.

Sizing, measured with `lmsleep train --init` itself on this 2-core box, the two runs side by side with one
thread each, while other agents kept the load average at ~5 (so each run got 1/3 to 1/2 of a core):
- float32, 3 steps: 37 s per step at N = 1, 47 s at N = 2 (batch 8, T = 96); a first try with window 64
  (T = 192) took 48 and 74 s, too slow for an hour;
- bf16 autocast (the settings below), the first steps of the real run under `nice -n 19`: 38 s per step at
  N = 1 (20 tokens/s), 53 s at N = 2 (14 tokens/s); peak RSS 2.4 and 2.8 GiB.
Unloaded, `python -m experiments.retrofit.measure` gives 2.9 s per sequence in float32 at T = 192 (N = 1 and 2
alike: the second pass runs only the looped blocks over the context windows, and backward through it is short),
i.e. about half the loaded times. STEPS = 75 at ~50 s: ~1 hour for N = 2 on the loaded box (~30 min unloaded),
plus 3 in-training evaluations of 32 examples and the final sleep-eval (forward only, ~10 min); both runs at
once on the two cores. The run in docs/RESULTS.md took 27 and 31 min (21.4 and 24.5 s per step with its
evaluations: the load fell during it) and 8 min of sleep-eval.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

SOURCE = "smollm2-135m-instruct"
WINDOW = 32  # L in SmolLM2 tokens: one fact (and filler) per window
TASK_ARGS = {"window": WINDOW, "k": [1, 2], "facts": [1, 1]}  # T = (2 + 1) * 32 = 96 tokens
PASSES = (1, 2)
STEPS = 75
BATCH = 8  # sequences per optimizer step, accumulated from micro-batches of 2
# The `retrofit` train preset (--freeze base) adapted to a short CPU run: its bf16 autocast (this Xeon's AMX units:
# ~1.7x float32's speed, docs/TRAINING.md), no per-window recomputation (a micro-batch of 2 peaks at ~2 GiB: memory
# is not the limit, time is), a short warm-up; the paper's Muon 1e-3 / AdamW 5e-5 (the preset's; not tuned here).
# (A first try with 3x both showed a loss of 9.3 at steps 7-8 against ~6 before; at 1e-3 the same two steps show
# 9.4 and 9.5: those batches are hard, the lr was not the cause.)
SETS = {"batch_size": BATCH, "grad_accum": BATCH // 2, "warmup_steps": 10, "eval_interval": 25,
        "eval_samples": 32, "save_interval": 5, "log_interval": 1, "dtype": "bfloat16",
        "checkpoint_windows": False, "seed": 0}
EVAL_N = 128  # examples of the final sleep-eval (seed 1: never a training batch)
EVAL_PASSES = (1, 2)


@dataclass(frozen=True)
class Run:
    name: str
    passes: int

    def train_argv(self, root: str) -> list[str]:
        argv = ["train", "--init", f"{root}/retrofit", "--freeze", "base", "--preset", "retrofit",
                "--task", "recall", *task_argv(root), "--passes", str(self.passes), "--steps", str(STEPS)]
        for key, value in SETS.items():
            argv += ["--set", f"{key}={arg(value)}"]
        return argv + ["--out", f"{root}/{self.name}", "--quiet"]


def task_argv(root: str) -> list[str]:
    """--task-arg flags of the recall task in the retrofit's own tokenizer."""
    pairs = {**TASK_ARGS, "tokenizer_dir": f"{root}/retrofit"}
    return [a for k, v in pairs.items() for a in ("--task-arg", f"{k}={arg(v)}")]


def arg(value) -> str:
    """A flag value as lmsleep reads it (JSON, else a string): compact JSON, strings bare."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def retrofit_argv(root: str) -> list[str]:
    return ["retrofit", SOURCE, f"{root}/retrofit", "--window", str(WINDOW), "--passes", "1", "--backend", "torch"]


def runs() -> list[Run]:
    return [Run(f"n{n}", n) for n in PASSES]


def sleep_eval_argv(root: str) -> list[str]:
    argv = ["sleep-eval", "--task", "recall", *task_argv(root), "--retrofit", f"{root}/retrofit"]
    for r in runs():
        argv += ["--trained", f"{root}/{r.name}/model"]
    for n in EVAL_PASSES:
        argv += ["--passes", str(n)]
    return argv + ["--n", str(EVAL_N), "--whole-trained", "--json", f"{root}/sleep_eval.json",
                   "--plot", f"{root}/sleep_eval.png"]


def command(argv: list[str]) -> str:
    """The shell form of an lmsleep argv (JSON lists quoted for a shell)."""
    return "lmsleep " + " ".join(f"'{a}'" if any(c in a for c in "[]{} ,\"") else a for a in argv)
