"""Cross-backend parity: the same weights in sleep_torch and sleep_mlx, stage by stage, in float32.

Both models get a tracer (`model.tracer`, called with ("embed", 0, h), ("block", i, h) after each
block of each wake pass, and (run.stage, run.block, S) after each SSM block run of a sleep, where
the runs are common.sleep.sleep_plan's: "pass{n}" for n >= 2, "coda") and run the same random tokens
through `model(tokens)`. Each traced value is
one row of the report, with its max absolute error and its relative error max|mlx - torch| / max|torch|
(torch is the reference); the final logits are the last row. Greedy generation is then compared
step by step: both backends stream the tokens torch picks (so one near-tie cannot derail the rest),
and a step counts where torch's top-2 logit margin exceeds 2 * tol * max|logits| (below that, float
rounding alone may swap the two). `ok`: every relative error <= tol and every counted step agrees.

    report = parity("runs/r110/model", passes=3)
    print(report.format_table()); assert report.ok
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from common.backends import require


@dataclasses.dataclass
class StageError:
    stage: str  # e.g. "window 2 block 1", "sleep 0 pass3 state 1", "logits"
    max_abs: float
    max_rel: float  # max_abs / max|torch|
    shape: tuple[int, ...]


@dataclasses.dataclass
class ParityReport:
    model_dir: str
    passes: int
    eviction: str
    tokens: int
    batch: int
    tol: float
    stages: list[StageError]
    gen_steps: int  # greedy steps run
    gen_compared: int  # steps whose torch top-2 margin is above the tolerance
    gen_agree: int  # compared steps where both backends pick the same token
    gen_agree_all: int  # all steps where both pick the same token (near-ties included)
    problems: list[str] = dataclasses.field(default_factory=list)  # traces that do not line up

    @property
    def max_rel(self) -> float:
        return max((s.max_rel for s in self.stages), default=0.0)

    @property
    def ok(self) -> bool:
        return not self.problems and self.max_rel <= self.tol and self.gen_agree == self.gen_compared

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "max_rel": self.max_rel, "ok": self.ok}

    def format_table(self) -> str:
        lines = [f"parity {self.model_dir}: torch (reference) vs mlx, float32, N={self.passes}, "
                 f"eviction={self.eviction}, tokens {self.batch}x{self.tokens}, tol {self.tol:g}",
                 f"{'stage':32s} {'max abs':>10s} {'max rel':>10s}"]
        for s in self.stages:
            flag = "" if s.max_rel <= self.tol else "  > tol"
            lines.append(f"{s.stage:32s} {s.max_abs:10.2e} {s.max_rel:10.2e}{flag}")
        lines += [f"problem: {p}" for p in self.problems]
        lines.append(f"greedy generation: {self.gen_agree}/{self.gen_compared} compared steps agree "
                     f"({self.gen_steps - self.gen_compared} near-ties skipped; {self.gen_agree_all}/"
                     f"{self.gen_steps} agree in all)")
        lines.append(f"{'OK' if self.ok else 'FAIL'}: max relative error {self.max_rel:.2e} "
                     f"({'<=' if self.max_rel <= self.tol else '>'} {self.tol:g})")
        return "\n".join(lines)


class _Recorder:
    """A tracer that labels each call with its window / sleep and keeps the value as float64 numpy.

    The model calls it with ("embed", 0, h) at the start of each wake pass, ("block", i, h) after
    each block of it, and, during a sleep, with each `common.sleep.Run`'s stage and block and the
    state that run leaves ("pass{n}" / "coda", i, S); a sleep is labelled by the window it consolidates.
    """

    def __init__(self, to_numpy):
        self.to_numpy, self.window, self.rows = to_numpy, -1, []

    def __call__(self, stage: str, index: int, value) -> None:
        if stage == "embed":
            self.window += 1
            label = f"window {self.window} embed"
        elif stage == "block":
            label = f"window {self.window} block {index}"
        else:
            label = f"sleep {self.window} {stage} state {index}"
        self.rows.append((label, self.to_numpy(value)))


def parity(model_dir: str | os.PathLike, *, passes: int | None = None, tokens: int = 64, batch: int = 2,
           seed: int = 0, gen_tokens: int = 50, eviction: str | None = None, tol: float = 1e-4) -> ParityReport:
    """Load `model_dir` in both backends (float32) and compare every traced stage and greedy generation."""
    ref, out = require("torch"), require("mlx")  # torch is the reference

    if tokens < 1 or batch < 1 or gen_tokens < 0:
        raise ValueError(f"tokens and batch must be >= 1 and gen_tokens >= 0 (got {tokens}, {batch}, {gen_tokens})")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    t_model = ref.module().load(model_dir, dtype="float32").eval()
    m_model = out.module().load(model_dir, dtype="float32")
    config = t_model.config if eviction is None else t_model.config.replace(eviction=eviction)
    t_model.config = m_model.config = config  # eviction is read at sleep time
    passes = config.sleep_passes if passes is None else passes
    t_np = lambda x: ref.to_numpy(x).astype(np.float64)  # noqa: E731
    m_np = lambda x: out.to_numpy(x).astype(np.float64)  # noqa: E731

    ids = np.random.default_rng(seed).integers(0, config.vocab_size, (batch, tokens))
    t_model.tracer, m_model.tracer = t_rec, m_rec = _Recorder(t_np), _Recorder(m_np)
    try:
        with ref.no_grad():
            t_logits = t_model(ref.array(ids), passes=passes)
        m_logits = m_model(out.array(ids), passes=passes)
    finally:
        t_model.tracer = m_model.tracer = None
    stages, problems = _compare(t_rec.rows + [("logits", t_np(t_logits))],
                                m_rec.rows + [("logits", m_np(m_logits))])

    prompt = np.random.default_rng(seed + 1).integers(0, config.vocab_size, (1, max(1, config.window // 2)))
    steps, compared, agree, agree_all = _greedy(t_model, m_model, prompt, gen_tokens, passes, tol, ref, out)
    return ParityReport(str(model_dir), passes, config.eviction, tokens, batch, tol, stages, steps, compared,
                        agree, agree_all, problems)


def _compare(ref_rows, out_rows) -> tuple[list[StageError], list[str]]:
    stages, problems = [], []
    if len(ref_rows) != len(out_rows):
        problems.append(f"torch traced {len(ref_rows)} values, mlx {len(out_rows)}")
    for (label, a), (other, b) in zip(ref_rows, out_rows):
        if label != other or a.shape != b.shape:
            problems.append(f"torch traced {label} {list(a.shape)} where mlx traced {other} {list(b.shape)}")
            break
        err = float(np.max(np.abs(a - b))) if a.size else 0.0
        if not np.isfinite(b).all():
            err = float("inf")
        scale = float(np.max(np.abs(a))) if a.size else 0.0
        stages.append(StageError(label, err, err / scale if scale > 0 else (0.0 if err == 0 else float("inf")),
                                 tuple(a.shape)))
    return stages, problems


def _greedy(t_model, m_model, prompt, n: int, passes: int, tol: float, ref, out):
    """Stream torch's greedy tokens through both models -> (steps, compared, agree, agree_all)."""
    t_state, m_state = t_model.new_state(1), m_model.new_state(1)
    compared = agree = agree_all = 0
    feed = prompt
    with ref.no_grad():
        for _ in range(n):
            a = ref.to_numpy(t_model.step(ref.array(feed), t_state, passes=passes)[0])[0, -1].astype(np.float64)
            b = out.to_numpy(m_model.step(out.array(feed), m_state, passes=passes)[0])[0, -1].astype(np.float64)
            top2 = np.sort(a)[-2:] if a.size > 1 else np.array([-np.inf, a[0]])
            same = int(np.argmax(a)) == int(np.argmax(b))
            agree_all += same
            if top2[1] - top2[0] > 2 * tol * np.max(np.abs(a)):
                compared += 1
                agree += same
            feed = np.array([[int(np.argmax(a))]])
    return n, compared, agree, agree_all


__all__ = ["parity", "ParityReport", "StageError"]
