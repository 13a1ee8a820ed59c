"""gsm-infinite: answers and op counts re-derived by separate evaluators from the decoded text, lengths in tokens,
loss mask, determinism, scores and baselines, parameter errors; byte tokenizer, tiny BPE and SmolLM2's tokenizer."""

import json
import re
from collections import Counter

import numpy as np
import pytest

from common.tasks import make
from tests.common.test_recall import perfect, smollm2_tokenizer
from tests.retrofit.conftest import tiny_bpe  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def bpe(tiny_bpe):  # noqa: F811
    from common.hf_tokenizer import HFTokenizer

    return HFTokenizer(tiny_bpe[0], eos_token="<|endoftext|>")


def content_of(task, row):
    """The tokens after the left padding, and their text."""
    pad = task.pieces.pad
    start = int(np.argmax(row != pad))
    assert (row[:start] == pad).all() and (row[start:] != pad).all()
    return row[start:], task.tokenizer.decode(row[start:])


# ---- symbolic: propagate the assignments that can be derived

STATEMENT = re.compile(r" assign (V\d{6}) = (V\d{6}|-?\d+)(?: ([+-]) 1)?\.")


def symbolic_by_hand(text):
    """-> (answer text, number of derivable variables) from a decoded symbolic example."""
    question, rest = text.split(" Context:")
    query = int(re.search(r"are equal to (-?\d+)\?$", question)[1])
    body, answer = rest.split(" Answer: ")
    statements = STATEMENT.findall(body)
    assert "".join(m.group(0) for m in STATEMENT.finditer(body)) == body  # nothing else in the context
    defs = {}
    for var, src, op, in statements:
        assert var not in defs
        defs[var] = (src, {"+": 1, "-": -1, "": 0}[op])
    values = {}
    changed = True
    while changed:  # fixed point: a variable is known once its source is a number or a known variable
        changed = False
        for var, (src, delta) in defs.items():
            if var in values:
                continue
            base = int(src) if not src.startswith("V") else values.get(src)
            if base is not None:
                values[var] = base + delta
                changed = True
    expected = ", ".join(sorted(v for v, x in values.items() if x == query))
    return answer, expected, len(values)


# ---- medium / hard: quantities defined by sentences, totals implied by the places

TOTAL = re.compile(r"total number of (?:adult animals|schools|movies) in (.+)")
TOTAL2 = re.compile(r"total number of (?:newborn animal children|teachers from all schools|movie nominations) in (.+)")


def realistic_by_hand(text):
    """-> (answer text, value, operand count) from a decoded medium/hard example."""
    head, rest = text.split(" Problem:")
    question = head.removeprefix(" Question: ")
    body, answer = rest.split(" Answer: ")
    defs = {}
    for sentence in body.split(".")[:-1]:
        m = re.fullmatch(r" The (.+?) equals (.+)", sentence)
        assert m and m[1] not in defs, sentence
        defs[m[1]] = m[2]

    def counts_at(place):
        return [q for q in defs if re.fullmatch(r"number of .+ in " + re.escape(place), q)]

    def quantity(q):  # -> (value, operands read by its definition and everything below)
        if q in defs:
            return expression(defs[q])
        if m := TOTAL.fullmatch(q):
            parts = [quantity(c) for c in counts_at(m[1])]
            return sum(v for v, _ in parts), len(parts) + sum(o for _, o in parts)
        m = TOTAL2.fullmatch(q)
        value, ops = 0, 0
        for c in counts_at(m[1]):
            avg, = [a for a in defs if re.fullmatch(r"average number of .+ per " + re.escape(c[len("number of "):]), a)]
            (x, ox), (y, oy) = quantity(c), quantity(avg)
            value, ops = value + x * y, ops + 2 + ox + oy
        return value, ops

    def expression(rhs):
        if re.fullmatch(r"\d+", rhs):
            return int(rhs), 1
        if m := re.fullmatch(r"(\d+) (times|plus) (.+)", rhs):
            x, o = expression(m[3])
            return (int(m[1]) * x if m[2] == "times" else int(m[1]) + x), o + 1
        if m := re.fullmatch(r"the sum of the (.+?), the (.+?), and the (.+)", rhs):
            parts = [quantity(g) for g in m.groups()]
            return sum(v for v, _ in parts), 3 + sum(o for _, o in parts)
        if m := re.fullmatch(r"the (sum of|difference between) the (.+) and the (.+)", rhs):
            (x, ox), (y, oy) = quantity(m[2]), quantity(m[3])
            return (x + y if m[1] == "sum of" else x - y), 2 + ox + oy
        value, ops = quantity(re.fullmatch(r"the (.+)", rhs)[1])
        return value, ops + 1  # the quantity read is one operand

    if m := re.fullmatch(r"How many (.+) does (.+) have\?", question):
        value, ops = quantity(f"number of {m[1]} in {m[2]}")
    else:
        value, ops = quantity(re.fullmatch(r"What is the (.+)\?", question)[1])
    return answer, value, ops


SMALL = {"symbolic": dict(ops=[1, 6], length=[700, 900], window=300),
         "medium": dict(ops=[2, 8], length=[1200, 1500], window=500),
         "hard": dict(ops=[2, 8], length=[1500, 1800], window=600)}


@pytest.mark.parametrize("subset", ["symbolic", "medium", "hard"])
def test_answers_and_ops_rederived(subset):
    task = make("gsm-infinite", subset=subset, **SMALL[subset])
    batch = task.sample(40, seed=2)
    seen_ops = set()
    for i, row in enumerate(batch.tokens):
        _, text = content_of(task, row)
        assert text.startswith(" Question:")  # the question comes before the context
        if subset == "symbolic":
            answer, expected, ops = symbolic_by_hand(text)
            assert answer == expected
        else:
            answer, value, ops = realistic_by_hand(text)
            assert answer == str(value) and 1 <= value <= 999
        assert ops == batch.meta["ops"][i] and answer == batch.meta["answer"][i]
        assert task.tokenizer.decode(row[batch.loss_mask[i]]) == f" {answer}"
        seen_ops.add(ops)
    assert seen_ops == set(range(task.ops[0], task.ops[1] + 1))


def test_hard_has_averages_and_newborn_totals():
    task = make("gsm-infinite", subset="hard", ops=[6, 8], **{k: v for k, v in SMALL["hard"].items() if k != "ops"})
    texts = [content_of(task, row)[1] for row in task.sample(40, seed=5).tokens]
    assert any("average number of" in t.split(" Problem:")[1] for t in texts)
    assert any(TOTAL2.search(t) for t in texts) and any(TOTAL.search(t) for t in texts)
    medium = make("gsm-infinite", subset="medium", **SMALL["medium"])
    assert not any("average" in content_of(medium, r)[1] for r in medium.sample(20, seed=5).tokens)


@pytest.mark.parametrize("subset", ["symbolic", "medium"])
def test_lengths_in_tokens(bpe, subset):
    lo, hi = (800, 1000)
    task = make("gsm-infinite", subset=subset, ops=[2, 4], length=[lo, hi], window=250, tokenizer=bpe)
    batch = task.sample(12, seed=0)
    assert task.seq_len == hi == batch.tokens.shape[1]
    for i, row in enumerate(batch.tokens):
        content, text = content_of(task, row)
        # noise was added until the next statement would pass the target: within one statement of it
        longest = max(len(bpe.encode(s + ".")) for s in text.split(" Answer:")[0].split("."))
        assert lo - longest <= len(content) <= hi and len(content) == batch.meta["content"][i]
        s, n = batch.meta["answer_start"][i], batch.meta["answer_len"][i]
        assert s + n == hi and bpe.decode(row[s - 1: s]) == ":"  # the answer ends the sequence, after " Answer:"
        assert np.nonzero(batch.loss_mask[i])[0].tolist() == list(range(s, s + n))


def test_no_memory_baseline():
    whole = make("gsm-infinite", subset="medium", ops=[2, 3], length=[1000, 1200], window=1200)
    batch = whole.sample(12, seed=0)
    assert batch.meta["nomem_derivable"].all()  # the window covers everything: nothing is evicted
    assert whole.score(np.zeros_like(batch.tokens), batch)["nomem"] == 1.0
    task = make("gsm-infinite", subset="medium", ops=[2, 3], length=[1000, 1200], window=300)
    batch = task.sample(30, seed=0)
    assert not batch.meta["nomem_derivable"].any()  # the question sits in an evicted window
    answers = Counter(batch.meta["answer"].tolist())
    majority = answers.most_common(1)[0][1] / 30
    scores = task.score(np.zeros_like(batch.tokens), batch)
    assert scores["acc"] == 0.0 and scores["chance"] == pytest.approx(majority) == scores["nomem"]
    for op in (2, 3):
        group = Counter(a for a, o in zip(batch.meta["answer"], batch.meta["ops"]) if o == op)
        assert scores[f"chance_op{op}"] == pytest.approx(group.most_common(1)[0][1] / sum(group.values()))


def test_score_per_op_and_exact_match():
    task = make("gsm-infinite", subset="symbolic", **SMALL["symbolic"])
    batch = task.sample(60, seed=1)
    pred = perfect(batch)
    scores = task.score(pred, batch)
    assert {f"acc_op{k}" for k in range(1, 7)} <= set(scores)
    assert all(v == 1.0 for k, v in scores.items() if k.startswith("acc"))
    assert task.score(np.eye(task.vocab_size, dtype=np.float32)[pred], batch) == scores
    ops = batch.meta["ops"]
    for i in np.nonzero(ops >= 5)[0]:  # one wrong token (the last) of the answer fails the whole answer
        end = batch.meta["answer_start"][i] + batch.meta["answer_len"][i] - 1
        pred[i, end - 1] = (batch.tokens[i, end] + 1) % task.vocab_size
    s = task.score(pred, batch)
    assert s["acc_op5"] == s["acc_op6"] == 0.0 and s["acc_op1"] == 1.0 and s["acc"] == pytest.approx((ops < 5).mean())


def test_determinism_and_registry():
    task = make("gsm-infinite", subset="hard", **SMALL["hard"])
    a, b, c = task.sample(5, seed=7), task.sample(5, seed=7), task.sample(5, seed=8)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
    assert not np.array_equal(a.tokens, c.tokens)
    np.testing.assert_array_equal(task.sample(3, seed=7).tokens, a.tokens[:3])
    again = make("gsm-infinite", **json.loads(json.dumps(task.params)))
    np.testing.assert_array_equal(again.sample(5, seed=7).tokens, a.tokens)
    default = make("gsm-infinite")
    assert (default.window, default.seq_len, default.ops, default.subset) == (512, 2048, (2, 8), "medium")


@pytest.mark.parametrize("params, message", [
    ({"subset": "easy"}, "subset must be one of"),
    ({"ops": 1}, "ops must be"),
    ({"ops": [2, 40]}, "ops must be at most 20"),
    ({"length": [900, 500]}, "lo <= hi"),
    ({"length": 10**6}, "length must be at most"),
    ({"length": 300}, "context cannot fit the requested length with this tokenizer"),
    ({"subset": "symbolic", "ops": 20, "length": 600}, "cannot fit"),
    ({"window": 0}, "window must be"),
    ({"tokenizer": object()}, "lacks encode"),
    ({"tokenizer_dir": "x", "tokenizer": object()}, "not both"),
], ids=lambda v: ",".join(f"{k}={w}" for k, w in v.items()) if isinstance(v, dict) else "")
def test_bad_parameters_one_line(params, message):
    with pytest.raises(ValueError, match=message) as e:
        make("gsm-infinite", **params)
    assert "\n" not in str(e.value)


@pytest.mark.slow  # the real SmolLM2 tokenizer (read from the 98 MB GGUF)
def test_smollm2_tokenizer_lengths():
    tok = smollm2_tokenizer()
    for subset in ("symbolic", "medium", "hard"):
        task = make("gsm-infinite", subset=subset, length=[1536, 2048], window=512, tokenizer=tok)
        batch = task.sample(6, seed=0)
        assert batch.tokens.shape == (6, 2048) and task.vocab_size == 49152
        for i, row in enumerate(batch.tokens):
            content, text = content_of(task, row)
            assert tok.encode(text) == content.tolist()  # pieces concatenate to what the tokenizer itself gives
            assert 1536 - 200 <= len(content) <= 2048
            by_hand = symbolic_by_hand(text)[1] if subset == "symbolic" else str(realistic_by_hand(text)[1])
            assert by_hand == batch.meta["answer"][i] == text.split(" Answer: ")[1]
