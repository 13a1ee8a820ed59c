"""Rule 110: remember random states over evicted windows, then answer where each one goes.

Sequence (width=24, states=4, T = states*width + 1 + states = 101):
    [state 1: 24 bits][state 2][state 3][state 4] | a1 a2 a3 a4
Each state is one window of uniform random bits. Answer i is bit 0 (the state's first token) of
state i after `steps` Rule-110 updates with periodic boundary (cell 0's left neighbour is cell
width-1). The final window starts with '|', so every answer is predicted inside it.
Vocabulary: '0' -> 0, '1' -> 1, '|' -> 2 (character tokenizer); loss only on the answers.

Rule 110: new cell = bit (4*left + 2*centre + right) of the number 110 = 0b01101110.
"""

from __future__ import annotations

import numpy as np

from common.tasks.base import Batch, Task, answer_hits, check_int, check_sample_args, check_tokens
from common.tokenizers import CharTokenizer

RULE = 110


def rule110_step(cells: np.ndarray) -> np.ndarray:
    """One Rule-110 update of 0/1 cells [..., width] with periodic boundary."""
    left = np.roll(cells, 1, axis=-1)
    right = np.roll(cells, -1, axis=-1)
    pattern = (left << 2) | (cells << 1) | right  # 0..7
    return (RULE >> pattern) & 1


def rule110_majority_baseline(answers: np.ndarray) -> float:
    """Exact accuracy of always answering, per answer position, the more common bit of `answers`
    [n, states] (ties -> 1). Rule 110 answers are unbalanced, so this is the honest chance level."""
    answers = np.asarray(answers)
    majority = (2 * answers.sum(axis=0) >= answers.shape[0]).astype(answers.dtype)  # [states]
    return float((answers == majority).all(axis=1).mean())


class Rule110Task(Task):
    name = "rule110"

    def __init__(self, width: int = 24, states: int = 4, steps: int = 32):
        t = self.name
        self.width = check_int(t, "width", width, 3)
        self.states = check_int(t, "states", states, 1, self.width - 1)  # '|' + answers fit one window
        self.steps = check_int(t, "steps", steps, 0, 1 << 16)
        self.params = {"width": self.width, "states": self.states, "steps": self.steps}
        self.tokenizer = CharTokenizer(["0", "1", "|"])
        self.query_id = self.tokenizer.token_to_id("|")
        self.window = self.width
        self.seq_len = check_tokens(t, self.states * self.width + 1 + self.states)

    def sample(self, n: int, seed: int) -> Batch:
        n, seed = check_sample_args(self.name, n, seed)
        rng = np.random.default_rng(seed)
        S, W = self.states, self.width
        start = rng.integers(0, 2, size=(n, S, W), dtype=np.uint8)  # [n, S, W]; uint8: shifts ~6x faster than int32
        cells = start
        for _ in range(self.steps):
            cells = rule110_step(cells)
        answers = cells[:, :, 0].astype(np.int32)  # [n, S]

        tokens = np.empty((n, self.seq_len), np.int32)
        tokens[:, : S * W] = start.reshape(n, S * W)  # ids of '0'/'1' are the bits themselves
        tokens[:, S * W] = self.query_id
        tokens[:, S * W + 1:] = answers
        loss_mask = np.zeros((n, self.seq_len), np.bool_)
        loss_mask[:, S * W + 1:] = True
        return Batch(tokens, loss_mask, {"answers": answers})

    def score(self, logits_or_predictions, batch: Batch) -> dict[str, float]:
        """exact: all answers right (chance 1/2**states); per_answer: mean over answers;
        majority_exact: exact accuracy of the majority-bit baseline on this batch;
        chance_exact: 1/2**states."""
        hits = answer_hits(self.name, logits_or_predictions, batch)  # [n, states]
        return {
            "exact": float(hits.all(axis=1).mean()),
            "per_answer": float(hits.mean()),
            "majority_exact": rule110_majority_baseline(batch.meta["answers"]),
            "chance_exact": 0.5 ** self.states,
        }
