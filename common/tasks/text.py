"""Language modelling on a local file, through the byte-level tokenizer or a model's own (pretrained) one.

- `.jsonl` files: one JSON object per line, the document is its `field` ("text"); blank lines are
  skipped. Any other file: the whole UTF-8 file is one document.
- Every document is followed by <eot> (a pretrained tokenizer's eos/end-of-turn token); the stream is the
  concatenation. `tokenizer_dir=` (a model folder, e.g. a retrofit, or a Hugging Face folder) tokenizes
  with that model's own tokenizer (common.tasks.recall.load_tokenizer), the byte tokenizer otherwise.
- sample(n, seed): n crops of seq_len tokens starting at uniform random offsets; loss on every
  target (loss_mask False only at position 0, which has no prediction before it).
- score() needs logits: mean cross-entropy (nats per token) over counted targets and its
  perplexity, computed in float64 with log-sum-exp; plus argmax accuracy; and the loss / perplexity per
  window position (`loss_w{i}` over the targets of window i): after an eviction, what the State carries
  is all a window has of the past, so later windows show what sleep kept.
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

    def __init__(self, path: str, seq_len: int = 1024, window: int = 256, field: str = "text",
                 tokenizer_dir: str | None = None):
        t = self.name
        if not isinstance(path, (str, Path)) or not str(path):
            raise ValueError(f"{t}: path must be a file path, got {path!r}")
        self.seq_len = check_int(t, "seq_len", seq_len, 2)
        self.window = check_int(t, "window", window, 1)
        if not isinstance(field, str) or not field:
            raise ValueError(f"{t}: field must be a non-empty string, got {field!r}")
        self.params = {"path": str(path), "seq_len": self.seq_len, "window": self.window, "field": field}
        if tokenizer_dir is not None:
            from common.tasks.recall import load_tokenizer

            self.params["tokenizer_dir"] = str(tokenizer_dir)
        self.tokenizer = ByteTokenizer() if tokenizer_dir is None else load_tokenizer(t, None, tokenizer_dir)
        docs = read_documents(Path(path), field)
        if not any(docs):
            raise ValueError(f"{t}: {path} holds no text")
        if isinstance(self.tokenizer, ByteTokenizer):
            eot, dtype = self.tokenizer.eot_id, np.uint16  # 2 bytes per token keeps big files affordable
            encode = lambda doc: np.frombuffer(doc.encode("utf-8"), np.uint8)  # noqa: E731
        else:
            eot = next((i for i in (getattr(self.tokenizer, "eot_id", None), getattr(self.tokenizer, "eos_id", None))
                        if i is not None), None)
            if eot is None:
                raise ValueError(f"{t}: the tokenizer of {tokenizer_dir} has no end-of-text token to separate documents")
            dtype = np.uint32
            encode = lambda doc: np.asarray(self.tokenizer.encode(doc), np.int64)  # noqa: E731
        parts = []
        for doc in docs:
            parts.append(encode(doc).astype(dtype))
            parts.append(np.array([eot], dtype))
        self.stream = np.concatenate(parts)  # [N] token ids
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
        out = {"loss": loss, "perplexity": float(np.exp(loss)), "acc": acc}
        position = np.arange(1, T) // self.window  # the window each target token lies in
        for w in range(int(position[-1]) + 1 if T > 1 else 0):
            here = mask & (position == w)[None, :]
            if here.any():
                out[f"loss_w{w}"] = float(nll[here].mean())
                out[f"perplexity_w{w}"] = float(np.exp(out[f"loss_w{w}"]))
        return out
