"""Language modelling on a local file through the byte-level tokenizer.

- `.jsonl` files: one JSON object per line, the document is its `field` ("text"); blank lines are
  skipped. Any other file: the whole UTF-8 file is one document.
- Every document is followed by <eot>; the stream is the concatenation.
- sample(n, seed): n crops of seq_len tokens starting at uniform random offsets; loss on every
  target (loss_mask False only at position 0, which has no prediction before it).
- score() needs logits: mean cross-entropy (nats per token) over counted targets and its
  perplexity, computed in float64 with log-sum-exp; plus argmax accuracy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from common.tasks.base import Batch, Task, check_int, check_sample_args
from common.tokenizers import ByteTokenizer
from common.validate import regular_file


def read_documents(path: Path, field: str) -> list[str]:
    if os.path.lexists(path) and not path.is_dir():  # a FIFO or a device would block or never end: lstat first
        try:
            regular_file(path, None, "text data file")
        except ValueError as e:
            raise ValueError(f"text: {e}") from None
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"text: file not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"text: {path} is a directory, not a file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"text: {path} is not UTF-8 (byte {e.start}: {e.reason})") from None
    if path.suffix.lower() != ".jsonl":
        return [raw] if raw else []
    docs = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"text: {path} line {lineno}: not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise ValueError(f"text: {path} line {lineno}: no string field {field!r}")
        docs.append(record[field])
    return docs


class TextTask(Task):
    name = "text"

    def __init__(self, path: str, seq_len: int = 1024, window: int = 256, field: str = "text"):
        t = self.name
        if not isinstance(path, (str, Path)) or not str(path):
            raise ValueError(f"{t}: path must be a file path, got {path!r}")
        self.seq_len = check_int(t, "seq_len", seq_len, 2)
        self.window = check_int(t, "window", window, 1)
        if not isinstance(field, str) or not field:
            raise ValueError(f"{t}: field must be a non-empty string, got {field!r}")
        self.params = {"path": str(path), "seq_len": self.seq_len, "window": self.window, "field": field}
        self.tokenizer = ByteTokenizer()
        docs = read_documents(Path(path), field)
        if not any(docs):
            raise ValueError(f"{t}: {path} holds no text")
        eot = np.array([self.tokenizer.eot_id], np.uint16)
        parts = []
        for doc in docs:
            parts.append(np.frombuffer(doc.encode("utf-8"), np.uint8).astype(np.uint16))
            parts.append(eot)
        self.stream = np.concatenate(parts)  # uint16 [N]: 2 bytes per token keeps big files affordable
        if len(self.stream) < self.seq_len + 1:
            raise ValueError(f"{t}: {path} has {len(self.stream)} tokens (with <eot>), fewer than "
                             f"seq_len + 1 = {self.seq_len + 1}")

    def sample(self, n: int, seed: int) -> Batch:
        n, seed = check_sample_args(self.name, n, seed)
        rng = np.random.default_rng(seed)
        start = rng.integers(0, len(self.stream) - self.seq_len + 1, size=n)  # [n]
        tokens = self.stream[start[:, None] + np.arange(self.seq_len)]  # [n, T]
        loss_mask = np.ones(tokens.shape, np.bool_)
        loss_mask[:, 0] = False
        return Batch(tokens.astype(np.int32), loss_mask, {"start": start})

    def score(self, logits, batch: Batch) -> dict[str, float]:
        """loss: mean nats per counted target; perplexity = exp(loss); acc: argmax accuracy."""
        x = np.asarray(logits)
        n, T = batch.tokens.shape
        if x.ndim != 3 or not np.issubdtype(x.dtype, np.floating) or x.shape[:2] != (n, T):
            raise ValueError(f"text: score() needs float logits [{n}, {T}, V], got {x.dtype} {list(x.shape)}")
        x = x[:, :-1].astype(np.float64)  # [n, T-1, V] predicts tokens[:, 1:]
        target = batch.tokens[:, 1:]
        mask = batch.loss_mask[:, 1:]
        top = x.max(axis=-1, keepdims=True)
        lse = np.log(np.exp(x - top).sum(axis=-1)) + top[..., 0]  # [n, T-1]
        nll = lse - np.take_along_axis(x, target[..., None], axis=-1)[..., 0]
        loss = float(nll[mask].mean())
        acc = float((x.argmax(axis=-1) == target)[mask].mean())
        return {"loss": loss, "perplexity": float(np.exp(loss)), "acc": acc}
