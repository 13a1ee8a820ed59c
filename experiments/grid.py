"""The laptop-scale reproduction of the paper's headline (docs/RESULTS.md): every run as an `lmsleep`
command line, so each number in RESULTS.md can be re-made one run at a time.

Scale-down from the paper (PAPER.md "Setup"), the same for every run of a task:
- model: preset small-rule110 (4 layers A,S,A,S, width 64, 4 heads of 16; the paper: width 256);
- batch 32 (paper: 512 for Rule 110, 128 for Depo), a few hundred steps (paper: ~5B tokens);
- Muon lr 1e-2 / AdamW lr 1e-3 (the preset's, tuned on N = 1 at t = 0 only), 20 warmup steps, cosine;
- the same data order for every N: the step's batch depends on (seed, step) only;
- Depo shrunk to cycles of 5..7 nodes, left-padded to 4 windows of L = 16 (paper: <= 75 nodes, L = 75);
  5..7 so that no evaluated k in {1, 2, 4, 8, 16} is a multiple of the cycle length (the answer would
  be the query's own node).
"""

from __future__ import annotations

from dataclasses import dataclass, field

PRESET = "small-rule110"
BATCH = 32
COMMON_SETS = {"batch_size": BATCH, "warmup_steps": 20, "eval_samples": 256, "save_interval": 100}
EVAL_N = 1024  # examples in the final evaluation (seed 1, disjoint from the training seeds' batches)
EVAL_PASSES = (1, 2, 3, 4)

RULE110_STEPS = 400
RULE110_DEPTHS = (1, 2)
RULE110_PASSES = (1, 2, 3, 4)
DEPO_ARGS = {"max_nodes": 7, "min_nodes": 5, "pool": 14, "context": 64, "window": 16, "queries": 4}
DEPO_STEPS = 800
DEPO_PASSES = (1, 2, 4)
SEEDS = (0, 1)
# the Muon lr check of N = 1 at t = 2 (the preset's 1e-2 was tuned on N = 1 at t = 0): x0.3 and x3
LR_SWEEP = (3e-3, 3e-2)
# t = 2 leaves its loss plateau only after ~250-300 steps, so the t = 2 comparison is repeated 3x longer
LONG_DEPTH, LONG_STEPS, LONG_PASSES, LONG_SEEDS = 2, 1200, (4, 1), (0, 1, 2)
# N = 1 trained for as long (wall time) as N = 4 takes for LONG_STEPS: 1.23 / 0.33 s per step here
EQUAL_TIME_STEPS = 4400


@dataclass(frozen=True)
class Run:
    name: str  # folder under the experiments root, also the job's name
    task: str
    passes: int
    seed: int
    steps: int
    task_args: dict = field(default_factory=dict)
    sets: dict = field(default_factory=dict)  # extra TrainConfig/ModelConfig overrides (the lr sweep)

    def train_argv(self, root: str) -> list[str]:
        argv = ["train", "--task", self.task, "--preset", PRESET]
        for key, value in self.task_args.items():
            argv += ["--task-arg", f"{key}={value}"]
        for key, value in {**COMMON_SETS, "seed": self.seed, "eval_interval": self.steps // 8, **self.sets}.items():
            argv += ["--set", f"{key}={value}"]
        return argv + ["--passes", str(self.passes), "--steps", str(self.steps), "--out", f"{root}/{self.name}",
                       "--quiet"]

    def eval_argv(self, root: str) -> list[str]:
        argv = ["eval", f"{root}/{self.name}/model", "--n", str(EVAL_N)]
        for n in EVAL_PASSES:
            argv += ["--passes", str(n)]
        return argv + ["--json", f"{root}/{self.name}/eval.json"]


def runs() -> list[Run]:
    """All runs, in the order the runner starts them (the headline comparison first)."""
    out = []
    for seed in SEEDS:
        for t in RULE110_DEPTHS:
            out += [Run(f"rule110-t{t}-n{n}-s{seed}", "rule110", n, seed, RULE110_STEPS, {"steps": t})
                    for n in RULE110_PASSES]
    out += [Run(f"depo-n{n}-s0", "depo", n, 0, DEPO_STEPS, dict(DEPO_ARGS)) for n in DEPO_PASSES]
    out += [Run(f"rule110-t2-n1-lr{lr:g}-s0", "rule110", 1, 0, RULE110_STEPS, {"steps": 2},
                {"muon_lr": lr, "adamw_lr": round(lr / 10, 6)}) for lr in LR_SWEEP]
    for n in LONG_PASSES:
        out += [Run(f"rule110-t{LONG_DEPTH}-n{n}-{LONG_STEPS}steps-s{seed}", "rule110", n, seed, LONG_STEPS,
                    {"steps": LONG_DEPTH}) for seed in LONG_SEEDS]
    out.append(Run(f"rule110-t{LONG_DEPTH}-n1-long-s0", "rule110", 1, 0, EQUAL_TIME_STEPS, {"steps": LONG_DEPTH}))
    out += [Run(f"depo-n{n}-s1", "depo", n, 1, DEPO_STEPS, dict(DEPO_ARGS)) for n in DEPO_PASSES]  # if time allows
    return out


def command(argv: list[str]) -> str:
    """The shell form of an lmsleep argv, as RESULTS.md prints it."""
    return "lmsleep " + " ".join(argv)
