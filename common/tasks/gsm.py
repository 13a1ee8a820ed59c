"""GSM-Infinite-style symbolic problems: find one value in a long list of modular assignments.

Sequence (defaults: window 256, context 4 windows, T = 4*256 + 3 = 1027):
    <pad> ... <pad> what is v17 ? v3 = 5 ; v80 = v3 * v41 ; ... v17 = v9 - v52 ;    context (1024 tokens)
    answer : 11                                                                      final window
- The answer's program: `m` operations, m ~ U[ops_lo, ops_hi] per example, forming a random
  binary tree: m+1 constant statements "x = 7 ;" (4 tokens) and m operation statements
  "y = a + b ;" (6 tokens; + - * modulo the prime `modulus`), every one of them needed.
- Distractors: statements of the same two shapes (half each) whose operands are any earlier
  variable, the needed ones included; nothing needed depends on a distractor.
- Order: a uniformly random interleaving of the two lists, so every variable is defined before
  it is used (a valid topological order) and each statement defines a fresh variable.
- Length: question + statements take B tokens, B ~ U[lo*window, hi*window] for
  context_windows = (lo, hi) (distractors are added while they fit); left-padded with <pad>
  to exactly hi*window tokens. The loss is on the answer number only (one token 0..modulus-1).
- Variable names v0..v{variables-1} are drawn without replacement per example; `variables`
  defaults to the most statements that fit the context, (hi*window - 4) // 4.
"""

from __future__ import annotations

import numpy as np

from common.tasks.base import (Batch, Task, answer_hits, check_int, check_range, check_sample_args, check_tokens,
                               grouped_accuracy, json_range)
from common.tokenizers import CharTokenizer

WORDS = ["<pad>", "what", "is", "?", "answer", ":", "=", ";", "+", "-", "*"]
OPS = "+-*"
OP_RATE = 0.5  # probability that a statement (needed, when both are possible, or distractor) is an operation


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, int(p ** 0.5) + 1))


class GsmTask(Task):
    name = "gsm"

    def __init__(self, ops=(1, 8), modulus: int = 23, window: int = 256, context_windows=(3, 4),
                 variables: int | None = None):
        t = self.name
        self.ops = check_range(t, "ops", ops, 1)
        self.modulus = check_int(t, "modulus", modulus, 2)
        if not _is_prime(self.modulus):
            raise ValueError(f"{t}: modulus must be a prime, got {self.modulus}")
        self.window = check_int(t, "window", window, 1)
        self.context_windows = check_range(t, "context_windows", context_windows, 1)
        self.context = self.context_windows[1] * self.window  # tokens before the answer window
        need_max = 4 + 10 * self.ops[1] + 4  # question + the largest program
        if need_max > self.context:
            raise ValueError(f"{t}: ops={json_range(ops)} needs up to {need_max} context tokens but "
                             f"context_windows*window = {self.context}")
        self.max_statements = (self.context - 4) // 4
        self.variables = check_int(t, "variables", self.max_statements if variables is None else variables,
                                   self.max_statements)
        self.params = {"ops": json_range(ops), "modulus": self.modulus, "window": self.window,
                       "context_windows": json_range(context_windows), "variables": self.variables}
        numbers = [str(i) for i in range(self.modulus)]
        names = [f"v{i}" for i in range(self.variables)]
        self.tokenizer = CharTokenizer(WORDS + numbers + names, sep=" ")
        self.ids = {w: i for i, w in enumerate(WORDS)}
        self.num0_id = len(WORDS)  # id of number x = num0_id + x
        self.var0_id = len(WORDS) + self.modulus  # id of v<i> = var0_id + i
        self.seq_len = check_tokens(t, self.context + 3)

    # ---- the needed program, one statement index j at a time, vectorized over examples ----
    def _program(self, rng, m):
        n, NM, p = len(m), 2 * self.ops[1] + 1, self.modulus
        r = np.arange(n)
        is_op = np.zeros((n, NM), bool)
        arg_a = np.zeros((n, NM), np.int64)  # operands: indices of earlier needed statements
        arg_b = np.zeros((n, NM), np.int64)
        code = rng.integers(0, 3, size=(n, NM))  # index into OPS
        value = rng.integers(0, p, size=(n, NM))  # constants now, overwritten for operations
        avail = np.zeros((n, NM), bool)  # computed but not yet used as an operand
        n_avail = np.zeros(n, np.int64)
        leaves_left = m + 1
        coin = rng.random((n, NM)) < OP_RATE
        for j in range(NM):
            active = j < 2 * m + 1
            op = active & (n_avail >= 2) & ((leaves_left == 0) | coin[:, j])
            keys = np.where(avail, rng.random((n, NM)), -1.0)
            a = keys.argmax(axis=1)
            keys[r, a] = -1.0
            b = keys.argmax(axis=1)
            va, vb, c = value[r, a], value[r, b], code[:, j]
            result = np.where(c == 0, va + vb, np.where(c == 1, va - vb, va * vb)) % p
            value[:, j] = np.where(op, result, value[:, j])
            is_op[:, j], arg_a[:, j], arg_b[:, j] = op, a, b
            avail[r[op], a[op]] = False
            avail[r[op], b[op]] = False
            avail[active, j] = True
            n_avail += active.astype(np.int64) - 2 * op
            leaves_left = leaves_left - (active & ~op)
        assert (n_avail == 1).all() and (leaves_left == 0).all()
        return is_op, arg_a, arg_b, code, value

    def sample(self, n: int, seed: int) -> Batch:
        n, seed = check_sample_args(self.name, n, seed)
        rng = np.random.default_rng(seed)
        W, C, p, ids = self.window, self.context, self.modulus, self.ids
        r = np.arange(n)[:, None]

        m = rng.integers(self.ops[0], self.ops[1] + 1, size=n)  # operations per example
        n_need = 2 * m + 1
        is_op, arg_a, arg_b, code, value = self._program(rng, m)
        answer = value[r[:, 0], n_need - 1]

        # distractors: as many as fit the per-example token budget
        DM = self.max_statements
        d_op = rng.random((n, DM)) < OP_RATE
        d_op[:, 0] = False  # the first distractor may come first, before anything it could use
        budget = rng.integers(self.context_windows[0] * W, C + 1, size=n)
        room = budget - 4 - (4 * (m + 1) + 6 * m)  # after the question and the needed program
        n_dist = (np.cumsum(np.where(d_op, 6, 4), axis=1) <= room[:, None]).sum(axis=1)
        n_stmt = n_need + n_dist  # <= max_statements

        # random interleaving: the n_need lowest random keys among the valid slots are the needed ones
        SM = 2 * self.ops[1] + 1 + DM
        s = np.arange(SM)[None, :]
        valid = s < n_stmt[:, None]
        rank = np.argsort(np.argsort(np.where(valid, rng.random((n, SM)), 2.0), axis=1), axis=1)
        need = rank < n_need[:, None]
        dist = valid & ~need
        need_pos = np.argsort(~need, axis=1, kind="stable")  # slots of needed statements, in order
        ni = np.clip(np.cumsum(need, axis=1) - 1, 0, None)  # needed index of each slot
        di = np.clip(np.cumsum(dist, axis=1) - 1, 0, DM - 1)  # distractor index of each slot

        # per-slot statement fields [n, SM]
        earlier = (rng.random((2, n, SM)) * s).astype(np.int64)  # distractor operands: any earlier slot
        slot_op = np.where(need, is_op[r, ni], d_op[r, di])
        slot_a = np.where(need, need_pos[r, arg_a[r, ni]], earlier[0])
        slot_b = np.where(need, need_pos[r, arg_b[r, ni]], earlier[1])
        slot_code = np.where(need, code[r, ni], rng.integers(0, 3, size=(n, SM)))
        slot_const = np.where(need, value[r, ni], rng.integers(0, p, size=(n, SM)))

        pool = rng.permuted(np.broadcast_to(np.arange(self.variables), (n, self.variables)), axis=1)
        names = np.zeros((n, SM), np.int64)
        names[:, : min(SM, self.variables)] = pool[:, :SM]
        var = self.var0_id + names
        pad = np.full((n, SM), ids["<pad>"])
        const_stmt = [var, np.full_like(var, ids["="]), self.num0_id + slot_const, np.full_like(var, ids[";"]),
                      pad, pad]
        op_stmt = [var, np.full_like(var, ids["="]), var[r, slot_a], ids["+"] + slot_code, var[r, slot_b],
                   np.full_like(var, ids[";"])]
        stmt = np.where(slot_op[..., None], np.stack(op_stmt, -1), np.stack(const_stmt, -1))  # [n, SM, 6]
        length = np.where(valid, np.where(slot_op, 6, 4), 0)

        root = var[r[:, 0], need_pos[r[:, 0], n_need - 1]]
        question = np.stack([np.full(n, ids["what"]), np.full(n, ids["is"]), root, np.full(n, ids["?"]),
                             np.full(n, ids["<pad>"]), np.full(n, ids["<pad>"])], -1)  # [n, 6]
        stmt = np.concatenate([question[:, None], stmt], axis=1).reshape(n, -1)  # [n, (1+SM)*6]
        length = np.concatenate([np.full((n, 1), 4), length], axis=1)
        keep = (np.arange(6) < length[..., None]).reshape(n, -1)

        # right-align the kept tokens in the context: left padding
        count = keep.sum(axis=1)
        dest = C - count[:, None] + np.cumsum(keep, axis=1) - 1
        tokens = np.full((n, self.seq_len), ids["<pad>"], np.int32)
        tokens[np.broadcast_to(r, keep.shape)[keep], dest[keep]] = stmt[keep]
        tokens[:, C] = ids["answer"]
        tokens[:, C + 1] = ids[":"]
        tokens[:, C + 2] = self.num0_id + answer
        loss_mask = np.zeros((n, self.seq_len), np.bool_)
        loss_mask[:, C + 2] = True
        meta = {"ops": m.astype(np.int32), "answers": (self.num0_id + answer).astype(np.int32),
                "statements": n_stmt.astype(np.int32), "distractors": n_dist.astype(np.int32)}
        return Batch(tokens, loss_mask, meta)

    def score(self, logits_or_predictions, batch: Batch) -> dict[str, float]:
        """acc: over all examples; acc_op{n}: over the examples with n operations present in the batch."""
        hits = answer_hits(self.name, logits_or_predictions, batch)[:, 0]  # [n]
        return {"acc": float(hits.mean()), **grouped_accuracy(hits, batch.meta["ops"], "acc_op")}
