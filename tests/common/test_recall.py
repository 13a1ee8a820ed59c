"""recall: answers re-derived from the decoded text, fact-to-question distance measured in tokens, loss mask,
determinism, scores, parameter errors; with the byte tokenizer, a tiny byte-level BPE and SmolLM2's tokenizer."""

import functools
import json
import re

import numpy as np
import pytest

from common.tasks import make
from tests.retrofit.conftest import tiny_bpe  # noqa: F401 (fixture)

CITIES_N, JOBS_N, CODES_N = 40, 30, 9000


@pytest.fixture(scope="module")
def bpe(tiny_bpe):  # noqa: F811
    from common.hf_tokenizer import HFTokenizer

    return HFTokenizer(tiny_bpe[0], eos_token="<|endoftext|>")


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    """SmolLM2's tokenizer from the bundled GGUF (read once per session: ~5 s); skips when it is not installed."""
    pytest.importorskip("gguf")
    pytest.importorskip("tokenizers")
    from common.hf_tokenizer import HFTokenizer
    from convert.gguf import read_gguf
    from convert.sources import bundled_path

    try:
        path = bundled_path("smollm2-135m-instruct")
    except ValueError as e:
        pytest.skip(str(e))
    return HFTokenizer.from_files(read_gguf(path, load_tensors=False, hash_file=False).files)


def perfect(batch):
    pred = np.zeros_like(batch.tokens)
    pred[:, :-1] = batch.tokens[:, 1:]
    return pred


# ---- an independent reader of the text

FACT = re.compile(r"(\w+) lives in (\w+)\.|The code of locker (\d+) is (\d+)\.|(\w+) works as a (\w+)\."
                  r"|(\w+) lives where (\w+) lives\.")
QA = re.compile(r"Question: (.*?) Answer: (\w+)\.")


def read_facts(text):
    """-> {("lives"|"locker"|"job"|"link", subject): value} from every fact sentence of the text."""
    facts = {}
    for m in FACT.finditer(text.split("Question:")[0]):
        g = m.groups()
        kind, subject, value = (("lives", g[0], g[1]) if g[0] else ("locker", g[2], g[3]) if g[2] else
                                ("job", g[4], g[5]) if g[4] else ("link", g[6], g[7]))
        assert (kind, subject) not in facts
        facts[kind, subject] = value
    return facts


def answer_by_hand(question, facts):
    if m := re.fullmatch(r"Where does (\w+) live\?", question):
        who = m[1]
        if ("link", who) in facts:  # two hops: live where someone else lives
            who = facts["link", who]
        return facts["lives", who]
    if m := re.fullmatch(r"What is the code of locker (\d+)\?", question):
        return facts["locker", m[1]]
    m = re.fullmatch(r"What is the job of (\w+)\?", question)
    return facts["job", m[1]]


def find(row, ids):
    """Start of the only occurrence of the token list ids in row."""
    ids, row = list(ids), list(row)
    hits = [i for i in range(len(row) - len(ids) + 1) if row[i: i + len(ids)] == ids]
    assert len(hits) == 1, f"{len(hits)} occurrences"
    return hits[0]


def fact_text(kind, subject, value):
    return {"lives": f" {subject} lives in {value}.", "locker": f" The code of locker {subject} is {value}.",
            "job": f" {subject} works as a {value}.", "link": f" {subject} lives where {value} lives."}[kind]


# ---- tests

@pytest.mark.parametrize("tok", ["byte", "bpe"])
def test_answers_rederived_from_text(tok, bpe):
    task = make("recall", window=256, facts=[2, 4], queries=2, hops=[1, 2], k=[1, 3],
                **({"tokenizer": bpe} if tok == "bpe" else {}))
    batch = task.sample(24, seed=3)
    assert batch.tokens.shape == (24, 4 * 256) and batch.tokens.dtype == np.int32
    for i, row in enumerate(batch.tokens):
        text = task.tokenizer.decode(row)
        facts = read_facts(text)
        assert len([f for f in facts if f[0] != "link"]) == batch.meta["facts"][i]
        qas = QA.findall(text)
        assert len(qas) == 2 and text.endswith(".")
        for question, answer in qas:
            assert answer == answer_by_hand(question, facts)
        # the masked tokens are exactly the answers, in order
        masked = batch.loss_mask[i]
        assert task.tokenizer.decode(row[masked]) == "".join(f" {a}" for _, a in qas)
        assert masked.sum() == sum(len(task.tokenizer.encode(f" {a}")) for _, a in qas)
        assert (batch.meta["hops"][i] == 2).sum() == sum("lives where" in s for s in text.split("."))


@pytest.mark.parametrize("window, k", [(96, [1, 4]), (80, 2)], ids=["w96-k1-4", "w80-k2"])
def test_fact_comes_k_windows_before_its_question(bpe, window, k):
    task = make("recall", window=window, k=k, facts=[1, 2], hops=[1, 2], tokenizer=bpe)
    L, k_hi = window, task.k[1]
    batch = task.sample(30, seed=1)
    assert task.seq_len == (k_hi + 1) * L == batch.tokens.shape[1]
    seen = set()
    for i, row in enumerate(batch.tokens):
        text = bpe.decode(row)
        facts = read_facts(text)
        (question, _), = QA.findall(text)
        q = find(row, bpe.encode(" Question:"))
        assert q // L == k_hi  # the question is in the final window
        who = re.fullmatch(r"\w+ (?:does|is the code of locker|is the job of) (\w+)\W.*", question)[1]
        if ("link", who) in facts:  # two hops: the link's window, then the base fact's
            link = bpe.encode(fact_text("link", who, facts["link", who]))
            s = find(row, link)
            assert s // L == (s + len(link) - 1) // L  # inside one window
            assert k_hi - s // L == batch.meta["k_link"][i, 0]
            who = facts["link", who]
        kind = next(kd for kd, s in facts if s == who and kd != "link")
        ids = bpe.encode(fact_text(kind, who, facts[kind, who]))
        s = find(row, ids)
        assert s // L == (s + len(ids) - 1) // L  # the fact never straddles a window boundary
        distance = q // L - s // L
        assert distance == batch.meta["k"][i, 0] and task.k[0] <= distance <= task.k[1]
        seen.add(distance)
    assert seen == set(range(task.k[0], task.k[1] + 1))


def test_loss_mask_and_meta(bpe):
    task = make("recall", window=160, facts=3, queries=3, tokenizer=bpe)
    batch = task.sample(8, seed=0)
    n, T = batch.tokens.shape
    assert batch.loss_mask.dtype == np.bool_ and not batch.loss_mask[:, 0].any()
    for i in range(n):
        spans = np.zeros(T, bool)
        for s, length in zip(batch.meta["answer_start"][i], batch.meta["answer_len"][i]):
            spans[s: s + length] = True
            assert bpe.decode(batch.tokens[i, s - 1: s]) == ":"  # right after " Answer:"
        np.testing.assert_array_equal(spans, batch.loss_mask[i])
    for value in batch.meta.values():
        assert isinstance(value, np.ndarray) and value.shape[0] == n
    assert batch.tokens.max() < task.vocab_size


def test_determinism_and_prefix():
    task = make("recall")
    a, b, c = task.sample(6, seed=7), task.sample(6, seed=7), task.sample(6, seed=8)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
    assert not np.array_equal(a.tokens, c.tokens)
    np.testing.assert_array_equal(task.sample(4, seed=7).tokens, a.tokens[:4])  # example i depends on (seed, i)


def test_score_per_k_and_baselines():
    task = make("recall", window=160, k=[1, 3], facts=[2, 3], queries=2, hops=[1, 2])
    batch = task.sample(60, seed=0)
    pred = perfect(batch)
    scores = task.score(pred, batch)
    assert scores["acc"] == 1.0 and all(v == 1.0 for key, v in scores.items() if key.startswith("acc"))
    assert {"acc_k1", "acc_k2", "acc_k3", "acc_facts2", "acc_facts3", "acc_hops1", "acc_hops2"} <= set(scores)
    assert task.score(np.eye(task.vocab_size, dtype=np.float32)[pred], batch) == scores  # logits too
    # spoil the last token of every answer whose fact is 3 windows back
    k = batch.meta["k"]
    for i, j in zip(*np.nonzero(k == 3)):
        end = batch.meta["answer_start"][i, j] + batch.meta["answer_len"][i, j] - 1
        pred[i, end - 1] = (batch.tokens[i, end] + 1) % task.vocab_size
    s = task.score(pred, batch)
    assert s["acc_k3"] == 0.0 and s["acc_k1"] == s["acc_k2"] == 1.0 and s["acc"] == pytest.approx((k != 3).mean())
    pools = {0: CITIES_N, 1: CODES_N, 2: JOBS_N}
    chance = np.mean([1 / pools[kd] for kd in batch.meta["kind"].ravel()])
    assert s["chance"] == pytest.approx(chance) and s["nomem"] == s["chance"]


def test_registry_params_and_tokenizer_dir(tmp_path, tiny_bpe):  # noqa: F811
    task = make("recall", window=128, k=2)
    again = make("recall", **json.loads(json.dumps(task.params)))
    np.testing.assert_array_equal(again.sample(2, seed=1).tokens, task.sample(2, seed=1).tokens)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "tokenizer.json").write_text(tiny_bpe[0])
    (hf / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    from_dir = make("recall", window=160, tokenizer_dir=str(hf))
    assert from_dir.vocab_size == 300 and from_dir.params["tokenizer_dir"] == str(hf)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"format": "lm-sleep", "tokenizer": {"type": "byte"}}))
    assert make("recall", tokenizer_dir=str(model)).vocab_size == 258


@pytest.mark.parametrize("params, message", [
    ({"window": 4}, "window must be"),
    ({"k": 0}, "k must be"),
    ({"k": [3, 1]}, "lo <= hi"),
    ({"facts": 40}, "facts must be at most 16"),
    ({"queries": 2, "facts": [1, 3]}, "queries must be at most"),
    ({"hops": 3}, "hops must be 1 or 2"),
    ({"window": 64, "facts": 4}, "context cannot fit the requested length with this tokenizer"),
    ({"window": 16, "facts": 1}, "cannot fit"),
    ({"window": 8192, "k": 20}, "over 65536"),
    ({"tokenizer_dir": "/nonexistent/folder"}, "not a folder"),
    ({"tokenizer": object()}, "lacks encode"),
    ({"tokenizr": 1}, "unknown parameter"),
], ids=lambda v: ",".join(f"{k}={w}" for k, w in v.items()) if isinstance(v, dict) else "")
def test_bad_parameters_one_line(params, message):
    with pytest.raises(ValueError, match=message) as e:
        make("recall", **params)
    assert "\n" not in str(e.value)


def test_sample_bounds():
    task = make("recall")
    with pytest.raises(ValueError, match="n must be"):
        task.sample(0, seed=0)
    with pytest.raises(ValueError, match="over the bound"):
        task.sample(10**6, seed=0)


@pytest.mark.slow  # the real SmolLM2 tokenizer (read from the 98 MB GGUF)
def test_smollm2_tokenizer_lengths():
    tok = smollm2_tokenizer()
    task = make("recall", window=64, k=[1, 3], facts=[1, 3], hops=[1, 2], tokenizer=tok)
    batch = task.sample(16, seed=0)
    assert batch.tokens.shape == (16, 4 * 64)
    for i, row in enumerate(batch.tokens):
        text = tok.decode(row)
        (question, answer), = QA.findall(text)
        assert answer == answer_by_hand(question, read_facts(text))
        q = find(row, tok.encode(" Question:"))
        assert q // 64 == 3 and batch.meta["question_start"][i, 0] == q
        s = batch.meta["fact_start"][i, 0]
        assert 3 - s // 64 == batch.meta["k"][i, 0]
        assert tok.decode(row[batch.loss_mask[i]]) == f" {answer}"
