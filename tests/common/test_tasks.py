"""Task generators: answers re-derived here from the decoded tokens, alignment, determinism, scoring."""

import json

import numpy as np
import pytest

from common.tasks import TASKS, Batch, make, rule110_majority_baseline

# Small configs keep the per-example Python checks fast; "default" runs the documented defaults.
CONFIGS = {
    "rule110-default": ("rule110", {}),
    "rule110-t0": ("rule110", {"steps": 0}),
    "rule110-w8": ("rule110", {"width": 8, "states": 3, "steps": 5}),
    "depo-default": ("depo", {}),
    "depo-k8": ("depo", {"k": 8}),
    "depo-small": ("depo", {"max_nodes": 10, "context": 48, "window": 16, "queries": 3, "k": [1, 4],
                            "max_k": 4}),
    "gsm-default": ("gsm", {}),
    "gsm-small": ("gsm", {"ops": [2, 3], "modulus": 7, "window": 32, "context_windows": 2}),
}
REASONING = list(CONFIGS)


def make_config(config_id):
    name, params = CONFIGS[config_id]
    return make(name, **params)


def perfect_predictions(batch):
    pred = np.zeros_like(batch.tokens)
    pred[:, :-1] = batch.tokens[:, 1:]  # pred[:, t] predicts tokens[:, t+1]
    return pred


def one_hot_logits(pred, vocab_size):
    return np.eye(vocab_size, dtype=np.float32)[pred] * 5.0


# ---- independent re-derivations ----

RULE110_TABLE = {"111": "0", "110": "1", "101": "1", "100": "0", "011": "1", "010": "1", "001": "1", "000": "0"}


def rule110_by_hand(state: str, steps: int) -> str:
    w = len(state)
    for _ in range(steps):
        state = "".join(RULE110_TABLE[state[i - 1] + state[i] + state[(i + 1) % w]] for i in range(w))
    return state


def depo_by_hand(words, n_queries):
    """-> (successor dict, [(k, a, c)]) parsed back from decoded depo tokens."""
    context, queries = words[: len(words) - 4 * n_queries], words[len(words) - 4 * n_queries:]
    body = [w for w in context if w != "<pad>"]
    assert context[: len(context) - len(body)] == ["<pad>"] * (len(context) - len(body)), "padding only on the left"
    succ = {}
    for i in range(0, len(body), 4):
        a, arrow, b, comma = body[i: i + 4]
        assert (arrow, comma) == ("->", ",") and a not in succ
        succ[a] = b
    parsed = []
    for i in range(0, len(queries), 4):
        hop, a, colon, c = queries[i: i + 4]
        assert hop[0] == "h" and colon == ":"
        parsed.append((int(hop[1:]), a, c))
    return succ, parsed


def gsm_by_hand(words, modulus):
    """-> (question variable, answer word, values, statements, order) from decoded gsm tokens."""
    body = [w for w in words if w != "<pad>"]
    assert body[:2] == ["what", "is"] and body[3] == "?"
    target = body[2]
    assert body[-3:-1] == ["answer", ":"]
    statements, current = [], []
    for w in body[4:-3]:
        if w == ";":
            statements.append(current)
            current = []
        else:
            current.append(w)
    assert not current
    values, defs = {}, {}
    for st in statements:
        var, eq, *rhs = st
        assert eq == "=" and var not in values, f"bad or repeated statement {st}"
        if len(rhs) == 1:
            values[var] = int(rhs[0])
        else:
            a, op, b = rhs
            assert a in values and b in values, f"{st}: operand used before it is defined"
            x, y = values[a], values[b]
            values[var] = {"+": x + y, "-": x - y, "*": x * y}[op] % modulus
        defs[var] = rhs
    return target, body[-1], values, defs


def needed_ops(target, defs):
    """Number of operation statements the target depends on (each counted once)."""
    seen, stack, ops = set(), [target], 0
    while stack:
        var = stack.pop()
        if var in seen:
            continue
        seen.add(var)
        if len(defs[var]) == 3:
            ops += 1
            stack += [defs[var][0], defs[var][2]]
    return ops


# ---- answers re-derived from the tokens ----

@pytest.mark.parametrize("config_id", ["rule110-default", "rule110-t0", "rule110-w8"])
def test_rule110_answers(config_id):
    task = make_config(config_id)
    S, W, t = task.states, task.width, task.steps
    batch = task.sample(20, seed=1)
    for row in batch.tokens:
        text = task.tokenizer.decode(row)
        states, answers = text[: S * W], text[S * W + 1:]
        assert text[S * W] == "|" and len(answers) == S
        for i in range(S):
            assert answers[i] == rule110_by_hand(states[i * W: (i + 1) * W], t)[0]


@pytest.mark.parametrize("config_id", ["depo-default", "depo-k8", "depo-small"])
def test_depo_answers(config_id):
    task = make_config(config_id)
    batch = task.sample(30, seed=2)
    for row, n_nodes, ks in zip(batch.tokens, batch.meta["n_nodes"], batch.meta["k"]):
        succ, queries = depo_by_hand(task.tokenizer.decode(row).split(), task.queries)
        # the edges form one directed cycle over n_nodes distinct nodes
        assert len(succ) == n_nodes and set(succ.values()) == set(succ)
        node, length = next(iter(succ)), 0
        while True:
            node, length = succ[node], length + 1
            if node == next(iter(succ)):
                break
        assert length == n_nodes
        assert task.min_nodes <= n_nodes <= task.max_nodes
        for (k, a, c), meta_k in zip(queries, ks):
            assert k == meta_k and task.k[0] <= k <= task.k[1]
            for _ in range(k):
                a = succ[a]
            assert c == a


@pytest.mark.parametrize("config_id", ["gsm-default", "gsm-small"])
def test_gsm_answers(config_id):
    task = make_config(config_id)
    batch = task.sample(40, seed=3)
    assert batch.meta["distractors"].min() > 0
    for row, ops in zip(batch.tokens, batch.meta["ops"]):
        target, answer, values, defs = gsm_by_hand(task.tokenizer.decode(row).split(), task.modulus)
        assert answer == str(values[target])
        assert needed_ops(target, defs) == ops and task.ops[0] <= ops <= task.ops[1]


def test_gsm_op_counts_cover_the_range():
    batch = make("gsm").sample(400, seed=0)
    assert set(batch.meta["ops"].tolist()) == set(range(1, 9))


# ---- windows and alignment ----

@pytest.mark.parametrize("config_id", ["rule110-default", "rule110-w8"])
def test_rule110_windows(config_id):
    task = make_config(config_id)
    S, W = task.states, task.width
    batch = task.sample(16, seed=0)
    assert task.window == W and task.seq_len == S * W + 1 + S
    assert np.isin(batch.tokens[:, : S * W], [0, 1]).all()  # each state is exactly one window of bits
    final = np.arange(batch.tokens.shape[1]) >= S * W  # the final window starts with '|'
    assert (batch.tokens[:, S * W] == task.tokenizer.token_to_id("|")).all()
    assert final[batch.loss_mask.any(axis=0)].all()


@pytest.mark.parametrize("config_id", ["depo-default", "depo-small", "gsm-default", "gsm-small"])
def test_context_fills_whole_windows(config_id):
    task = make_config(config_id)
    batch = task.sample(16, seed=0)
    context = task.context
    assert context % task.window == 0
    assert batch.tokens.shape[1] - context <= task.window  # the rest fits the final window
    answer_positions = np.nonzero(batch.loss_mask.any(axis=0))[0]
    assert answer_positions.min() > context  # predicted inside the final window


def test_depo_default_layout():
    task = make("depo")
    assert (task.window, task.context, task.seq_len) == (75, 300, 340)


def test_gsm_default_layout_and_length():
    task = make("gsm")
    assert (task.window, task.context, task.seq_len) == (256, 1024, 1027)
    batch = task.sample(64, seed=0)
    content = (batch.tokens[:, : task.context] != task.tokenizer.token_to_id("<pad>")).sum(axis=1)
    lo, hi = task.context_windows
    assert (content > lo * task.window - 6).all() and (content <= hi * task.window).all()


# ---- loss mask, dtypes, determinism ----

@pytest.mark.parametrize("config_id", REASONING)
def test_loss_mask_on_answers_only(config_id):
    task = make_config(config_id)
    batch = task.sample(8, seed=0)
    n, T = batch.tokens.shape
    assert batch.tokens.dtype == np.int32 and batch.loss_mask.dtype == np.bool_
    assert batch.loss_mask.shape == (n, T) == (8, task.seq_len)
    assert not batch.loss_mask[:, 0].any()
    answers = batch.tokens[batch.loss_mask].reshape(n, -1)
    np.testing.assert_array_equal(answers, np.asarray(batch.meta["answers"]).reshape(n, -1))
    assert 0 <= batch.tokens.min() and batch.tokens.max() < task.vocab_size
    for value in batch.meta.values():
        assert isinstance(value, np.ndarray) and value.shape[0] == n


@pytest.mark.parametrize("config_id", REASONING)
def test_determinism(config_id):
    task = make_config(config_id)
    a, b, c = task.sample(32, seed=7), task.sample(32, seed=7), task.sample(32, seed=8)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
    assert not np.array_equal(a.tokens, c.tokens)


# ---- scoring ----

@pytest.mark.parametrize("config_id", REASONING)
def test_score_perfect_and_wrong(config_id):
    task = make_config(config_id)
    batch = task.sample(64, seed=0)
    pred = perfect_predictions(batch)
    perfect = task.score(pred, batch)
    assert task.score(one_hot_logits(pred, task.vocab_size), batch) == perfect
    main = "exact" if task.name == "rule110" else "acc"
    assert perfect[main] == 1.0
    accuracy_keys = [k for k in perfect if k in ("exact", "per_answer") or k.startswith("acc")]
    assert all(perfect[k] == 1.0 for k in accuracy_keys)
    wrong = pred.copy()
    rows, cols = np.nonzero(batch.loss_mask)
    wrong[rows[::2], cols[::2] - 1] = (batch.tokens[rows[::2], cols[::2]] + 1) % task.vocab_size
    assert task.score(wrong, batch)[main] < 1.0
    assert all(isinstance(v, float) for v in perfect.values())


def test_rule110_score_values():
    task = make("rule110", width=8, states=2, steps=0)
    tokens = np.array([[0] * 16 + [2, 1, 0], [1] * 16 + [2, 1, 1]], np.int32)
    mask = np.zeros_like(tokens, bool)
    mask[:, 17:] = True
    batch = Batch(tokens, mask, {"answers": np.array([[1, 0], [1, 1]])})
    pred = perfect_predictions(batch)
    pred[1, 17] = 0  # second example, second answer wrong
    s = task.score(pred, batch)
    assert s["exact"] == 0.5 and s["per_answer"] == 0.75 and s["chance_exact"] == 0.25
    assert s["majority_exact"] == 0.5  # majority bits (1, 1): right for the second example only


def test_rule110_majority_baseline():
    answers = np.array([[1, 0, 1], [1, 1, 1], [0, 1, 1], [1, 1, 0]])
    assert rule110_majority_baseline(answers) == 0.25  # majority (1, 1, 1): only row 1 matches
    batch = make("rule110", steps=32).sample(2000, seed=0)
    assert rule110_majority_baseline(batch.meta["answers"]) > 1 / 16  # answers are unbalanced


def test_depo_per_k_keys():
    task = make("depo", queries=5, k=[1, 16])
    batch = task.sample(200, seed=0)
    scores = task.score(perfect_predictions(batch), batch)
    assert {f"acc_k{k}" for k in range(1, 17)} <= set(scores)
    fixed = make("depo", k=4)
    batch = fixed.sample(8, seed=0)
    assert set(fixed.score(perfect_predictions(batch), batch)) == {"acc", "acc_k4"}


def test_depo_per_k_accuracy_is_grouped():
    task = make("depo", queries=2, k=[1, 2], max_nodes=10, context=40, window=20, max_k=2)
    batch = task.sample(50, seed=0)
    pred = perfect_predictions(batch)
    k = batch.meta["k"]
    cols = task.context + 3 + 4 * np.arange(2)  # answer positions
    for q in range(2):
        wrong = k[:, q] == 2
        pred[wrong, cols[q] - 1] = (batch.tokens[wrong, cols[q]] + 1) % task.vocab_size
    scores = task.score(pred, batch)
    assert scores["acc_k1"] == 1.0 and scores["acc_k2"] == 0.0
    assert scores["acc"] == pytest.approx((k == 1).mean())


def test_gsm_per_op_keys():
    task = make("gsm", ops=[2, 4])
    batch = task.sample(100, seed=0)
    pred = perfect_predictions(batch)
    hard = batch.meta["ops"] == 4
    pred[hard, -2] = (batch.tokens[hard, -1] + 1) % task.vocab_size
    scores = task.score(pred, batch)
    assert set(scores) == {"acc", "acc_op2", "acc_op3", "acc_op4"}
    assert scores["acc_op2"] == scores["acc_op3"] == 1.0 and scores["acc_op4"] == 0.0


@pytest.mark.parametrize("bad", [np.zeros((4, 5)), np.zeros((4, 101), np.float32), np.zeros((3, 101), np.int64)],
                         ids=["short", "float-2d", "wrong-n"])
def test_score_rejects_bad_shapes(bad):
    task = make("rule110")
    with pytest.raises(ValueError, match="rule110"):
        task.score(bad, task.sample(4, seed=0))


# ---- make() ----

def test_task_names():
    assert set(TASKS) == {"rule110", "depo", "gsm", "text", "gsm-infinite", "recall"}


@pytest.mark.parametrize("config_id", REASONING)
def test_params_rebuild_through_json(config_id):
    task = make_config(config_id)
    again = make(task.name, **json.loads(json.dumps(task.params)))
    assert again.params == task.params and again.vocab_size == task.vocab_size
    np.testing.assert_array_equal(again.sample(4, seed=1).tokens, task.sample(4, seed=1).tokens)


@pytest.mark.parametrize("name, params, message", [
    ("rule111", {}, "unknown task 'rule111'"),
    ("rule110", {"widht": 24}, "unknown parameter.*'widht'"),
    ("rule110", {"steps": -1}, "steps"),
    ("rule110", {"width": 4, "states": 4}, "states"),
    ("rule110", {"width": 2.5}, "width"),
    ("depo", {"k": 0}, "k must be"),
    ("depo", {"k": [1, 32]}, "max_k"),
    ("depo", {"k": [5, 2]}, "lo <= hi"),
    ("depo", {"context": 310}, "multiple of window"),
    ("depo", {"context": 150}, "context"),
    ("depo", {"queries": 19}, "queries"),
    ("gsm", {"modulus": 24}, "prime"),
    ("gsm", {"ops": [1, 80], "window": 32}, "ops"),
    ("gsm", {"variables": 10}, "variables"),
    ("text", {}, "needs parameter.*path"),
], ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(f"{k}={w}" for k, w in v.items()) or "none")
def test_make_errors(name, params, message):
    with pytest.raises(ValueError, match=message):
        make(name, **params)


def test_sample_argument_errors():
    task = make("rule110")
    with pytest.raises(ValueError, match="n must be"):
        task.sample(0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        task.sample(2, seed=1.5)


# ---- text ----

@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 20 + "naïve café", encoding="utf-8")
    return path


def test_text_crops_come_from_the_stream(text_file):
    task = make("text", path=str(text_file), seq_len=32, window=8)
    batch = task.sample(16, seed=0)
    stream = task.stream
    assert batch.tokens.shape == (16, 32) and batch.tokens.dtype == np.int32
    assert stream[-1] == task.tokenizer.eot_id and task.vocab_size == 258
    for row, start in zip(batch.tokens, batch.meta["start"]):
        np.testing.assert_array_equal(row, stream[start: start + 32])
    assert not batch.loss_mask[:, 0].any() and batch.loss_mask[:, 1:].all()
    np.testing.assert_array_equal(task.sample(16, seed=0).tokens, batch.tokens)


def test_text_jsonl_documents_joined_with_eot(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["abc", "dé", "xyz"])) + "\n")
    task = make("text", path=str(path), seq_len=4, window=4)
    assert task.tokenizer.decode(task.stream) == "abc<eot>dé<eot>xyz<eot>"


@pytest.mark.parametrize("content, suffix, message", [
    (None, ".txt", "not found"),
    ("", ".txt", "no text"),
    ("short", ".txt", "fewer than seq_len"),
    ('{"text": "a"}\nnot json\n', ".jsonl", "line 2: not JSON"),
    ('{"body": "a"}\n', ".jsonl", "no string field 'text'"),
], ids=["missing", "empty", "too-short", "bad-json", "no-field"])
def test_text_file_errors(tmp_path, content, suffix, message):
    path = tmp_path / f"data{suffix}"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        make("text", path=str(path), seq_len=16)


def test_text_score(text_file):
    task = make("text", path=str(text_file), seq_len=32, window=8)
    batch = task.sample(4, seed=0)
    V = task.vocab_size
    uniform = task.score(np.zeros((4, 32, V), np.float32), batch)
    assert uniform["loss"] == pytest.approx(np.log(V)) and uniform["perplexity"] == pytest.approx(V)
    # huge logits stay finite (log-sum-exp): a confident, perfect model has ~zero loss
    confident = one_hot_logits(perfect_predictions(batch), V) * 1e4
    scores = task.score(confident, batch)
    assert scores["loss"] == pytest.approx(0.0, abs=1e-6) and scores["acc"] == 1.0
    # a known value: the target has logit 1, every other token 0
    s = task.score(one_hot_logits(perfect_predictions(batch), V) / 5.0, batch)
    assert s["loss"] == pytest.approx(np.log(np.e + V - 1) - 1.0)
    with pytest.raises(ValueError, match="logits"):
        task.score(perfect_predictions(batch), batch)


# ---- speed sanity (no timing assertion: just make sure large batches run) ----

@pytest.mark.parametrize("name, n", [("rule110", 10_000), ("depo", 10_000), ("gsm", 1_000)])
def test_large_batches_generate(name, n):
    batch = make(name).sample(n, seed=0)
    assert batch.tokens.shape[0] == n
