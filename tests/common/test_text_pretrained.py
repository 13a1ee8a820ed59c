"""The text task with a model's own tokenizer, and its loss per window position."""

import numpy as np
import pytest

from common.tasks import make

pytest.importorskip("tokenizers")
from tests.retrofit.conftest import tiny_bpe  # noqa: E402,F401  (fixture)

TEXT = "The quick brown fox jumps over the lazy dog. Sleeping models remember what they read.\n" * 30


@pytest.fixture
def bpe_folder(tmp_path, tiny_bpe):  # noqa: F811
    """A Hugging Face-style folder holding only the tiny tokenizer.json (eos <|endoftext|>)."""
    import json

    text, _, _ = tiny_bpe
    (tmp_path / "tokenizer.json").write_text(text)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    (tmp_path / "doc.txt").write_text(TEXT)
    return tmp_path


def test_text_with_a_pretrained_tokenizer_streams_its_ids(bpe_folder):
    task = make("text", path=str(bpe_folder / "doc.txt"), seq_len=48, window=16, tokenizer_dir=str(bpe_folder))
    ids = task.tokenizer.encode(TEXT)  # independent: the whole file through the same tokenizer
    eot = task.tokenizer.eos_id
    assert list(task.stream) == ids + [eot]
    batch = task.sample(3, seed=0)
    for row, start in zip(batch.tokens, batch.meta["start"]):
        assert list(row) == (ids + [eot])[start:start + 48]
    assert task.params["tokenizer_dir"] == str(bpe_folder)


def test_loss_per_window_position(bpe_folder):
    task = make("text", path=str(bpe_folder / "doc.txt"), seq_len=48, window=16, tokenizer_dir=str(bpe_folder))
    batch = task.sample(2, seed=1)
    V = task.tokenizer.vocab_size
    logits = np.zeros((2, 48, V), np.float32)
    # right answers (logit 10) for targets in window 2 only: its loss drops, windows 0 and 1 stay uniform
    for i in range(2):
        for t in range(31, 47):  # logits[:, t] predicts tokens[:, t+1]; targets 32..47 lie in window 2
            logits[i, t, batch.tokens[i, t + 1]] = 10.0
    s = task.score(logits, batch)
    assert s["loss_w0"] == pytest.approx(np.log(V)) and s["loss_w1"] == pytest.approx(np.log(V))
    assert s["loss_w2"] == pytest.approx(np.log(np.exp(10.0) + V - 1) - 10.0)
    assert s["perplexity_w2"] == pytest.approx(np.exp(s["loss_w2"]))
    # the overall loss is the mean over every counted target (15 + 16 + 16 per row)
    assert s["loss"] == pytest.approx((31 * np.log(V) + 16 * s["loss_w2"]) / 47)
