"""Depo (Physics of LMs 4.1): store a shuffled directed cycle, then follow it k hops per query.

Sequence (defaults: T = context + 4*queries = 340):
    <pad> ... <pad> n17 -> n4 , n88 -> n17 , ...        context: exactly `context` tokens
    h3 n88 : n9 h1 n4 : n101 ...                         `queries` queries, 4 tokens each
- A cycle over n nodes, n ~ U[min_nodes, max_nodes] per example, node names drawn without
  replacement from a pool of `pool` single-token names n0..n{pool-1} (default 2*max_nodes).
- Its n edges "a -> b ," (4 tokens) in random order, left-padded with <pad> to `context`
  tokens; the context fills exactly context/window windows (4 by default).
- Query "h<k> a : c": a uniform over the cycle's nodes, c = the node k hops after a; loss on c only.
  k per query ~ U[k_lo, k_hi] (k a pair) or fixed (k an int); hop tokens h1..h{max_k} exist
  whatever k is, so training and evaluation configs share one vocabulary.
"""

from __future__ import annotations

import numpy as np

from common.tasks.base import (Batch, Task, answer_hits, check_int, check_range, check_sample_args, check_tokens,
                               grouped_accuracy, json_range)
from common.tokenizers import CharTokenizer


class DepoTask(Task):
    name = "depo"

    def __init__(self, max_nodes: int = 75, context: int = 300, queries: int = 10, k=(1, 16),
                 min_nodes: int = 3, window: int = 75, pool: int | None = None, max_k: int = 16):
        t = self.name
        self.max_nodes = check_int(t, "max_nodes", max_nodes, 2)
        self.min_nodes = check_int(t, "min_nodes", min_nodes, 2, self.max_nodes)
        self.context = check_int(t, "context", context, 4 * self.max_nodes)  # 4 tokens per edge
        self.window = check_int(t, "window", window, 1)
        if self.context % self.window:
            raise ValueError(f"{t}: context={self.context} must be a multiple of window={self.window}")
        self.queries = check_int(t, "queries", queries, 1, self.window // 4)  # all in the final window
        self.max_k = check_int(t, "max_k", max_k, 1)
        self.k = check_range(t, "k", k, 1)
        if self.k[1] > self.max_k:
            raise ValueError(f"{t}: k={json_range(k)} exceeds max_k={self.max_k}")
        self.pool = check_int(t, "pool", 2 * self.max_nodes if pool is None else pool, self.max_nodes)
        self.params = {"max_nodes": self.max_nodes, "context": self.context, "queries": self.queries,
                       "k": json_range(k), "min_nodes": self.min_nodes, "window": self.window,
                       "pool": self.pool, "max_k": self.max_k}
        specials = ["<pad>", "->", ",", ":"]
        hops = [f"h{i}" for i in range(1, self.max_k + 1)]
        nodes = [f"n{i}" for i in range(self.pool)]
        self.tokenizer = CharTokenizer(specials + hops + nodes, sep=" ")
        self.pad_id, self.arrow_id, self.comma_id, self.colon_id = range(4)
        self.hop0_id = len(specials) - 1  # id of h<k> = hop0_id + k
        self.node0_id = len(specials) + len(hops)  # id of n<i> = node0_id + i
        self.seq_len = check_tokens(t, self.context + 4 * self.queries)

    def sample(self, n: int, seed: int) -> Batch:
        n, seed = check_sample_args(self.name, n, seed)
        rng = np.random.default_rng(seed)
        M, Q = self.max_nodes, self.queries
        rows = np.arange(n)[:, None]

        # the cycle: cycle[i, j] -> cycle[i, (j+1) % size[i]] for j < size[i]
        size = rng.integers(self.min_nodes, M + 1, size=n)  # [n]
        names = rng.permuted(np.broadcast_to(np.arange(self.pool), (n, self.pool)), axis=1)
        cycle = names[:, :M]  # [n, M] pool indices; only the first size[i] are used
        j = np.arange(M)
        used = j[None, :] < size[:, None]  # [n, M]
        succ = cycle[rows, (j[None, :] + 1) % size[:, None]]  # [n, M]

        # shuffle the edges; unused edge slots sort first and become left padding
        keys = np.where(used, rng.random((n, M)), -1.0)
        order = np.argsort(keys, axis=1)
        src, dst, real = cycle[rows, order], succ[rows, order], used[rows, order]
        edges = np.stack([self.node0_id + src, np.full_like(src, self.arrow_id),
                          self.node0_id + dst, np.full_like(src, self.comma_id)], axis=-1)  # [n, M, 4]
        edges = np.where(real[:, :, None], edges, self.pad_id).reshape(n, 4 * M)

        # queries: start node uniform over the cycle, k hops ahead
        lo, hi = self.k
        hops = rng.integers(lo, hi + 1, size=(n, Q))
        start = (rng.random((n, Q)) * size[:, None]).astype(np.int64)  # [n, Q] in [0, size)
        answer = cycle[rows, (start + hops) % size[:, None]]
        query = np.stack([self.hop0_id + hops, self.node0_id + cycle[rows, start],
                          np.full_like(hops, self.colon_id), self.node0_id + answer], axis=-1)  # [n, Q, 4]

        tokens = np.full((n, self.seq_len), self.pad_id, np.int32)
        tokens[:, self.context - 4 * M: self.context] = edges
        tokens[:, self.context:] = query.reshape(n, 4 * Q)
        loss_mask = np.zeros((n, self.seq_len), np.bool_)
        loss_mask[:, self.context + 3:: 4] = True  # the c of every query
        meta = {"k": hops.astype(np.int32), "n_nodes": size.astype(np.int32),
                "answers": (self.node0_id + answer).astype(np.int32)}
        return Batch(tokens, loss_mask, meta)

    def score(self, logits_or_predictions, batch: Batch) -> dict[str, float]:
        """acc: over all queries; acc_k{K}: over the queries with k = K present in the batch."""
        hits = answer_hits(self.name, logits_or_predictions, batch)  # [n, queries]
        return {"acc": float(hits.mean()), **grouped_accuracy(hits, batch.meta["k"], "acc_k")}
