"""`lmsleep sleep-eval`: the bounds and the trained rows on tiny random retrofits (recall, own tokenizer)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.retrofit.conftest import hf_model, tiny_bpe, tiny_gguf, write_tiny_gguf  # noqa: F401 (fixtures)

pytest.importorskip("torch")
WINDOW = 64
TASK_ARGS = {"window": WINDOW, "k": [1, 2], "facts": [1, 1]}
N = 6


def fake_trained(src, out, passes: int, seed: int):
    """A 'trained' folder: the retrofit with random SSM output projections (so sleep changes the numbers)."""
    import torch

    import sleep_torch

    model = sleep_torch.load(src)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ssm.o_proj.weight"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    model.config = model.config.replace(sleep_passes=passes)
    sleep_torch.save(model, out)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_bpe):  # noqa: F811
    from convert.retrofit import retrofit

    tmp = tmp_path_factory.mktemp("sleepeval")
    _, tokens, merges = tiny_bpe
    gguf = write_tiny_gguf(tmp / "tiny.gguf", hf_model("llama", seed=1, vocab_size=len(tokens)), tokens, merges)
    base = tmp / "retro"
    retrofit(gguf, base, window=WINDOW, passes=2, insert=1, backend="torch")
    return {"gguf": gguf, "retrofit": base, "n1": fake_trained(base, tmp / "n1", 1, 0),
            "n2": fake_trained(base, tmp / "n2", 2, 1)}


@pytest.fixture(scope="module")
def task(folders):
    from common.tasks import make

    return make("recall", tokenizer_dir=str(folders["retrofit"]), **TASK_ARGS)


@pytest.fixture(scope="module")
def rows(folders, task):
    from lmsleep.sleepeval import sleep_eval

    return sleep_eval("torch", task, retrofit=folders["retrofit"], trained=[folders["n1"], folders["n2"]],
                      passes=(1, 2), n=N)


def test_rows_bounds_and_trained(rows, task):
    from lmsleep.sleepeval import EVICTED, WHOLE, difficulty_keys

    assert [(r["model"], r["passes"]) for r in rows] == [
        (WHOLE, 1), (EVICTED, 1), ("trained N=1", 1), ("trained N=1", 2), ("trained N=2", 1), ("trained N=2", 2)]
    whole = rows[0]
    assert whole["eviction"] == "none" and whole["window"] >= task.seq_len == 3 * WINDOW
    assert all(r["window"] == WINDOW and r["eviction"] == "hard" for r in rows[1:])
    assert [r["trained_passes"] for r in rows[2:]] == [1, 1, 2, 2]
    assert difficulty_keys(rows) == ["acc_k1", "acc_k2"]
    assert whole["loss"] != rows[1]["loss"]  # seeing the evicted windows changes the predictions
    assert rows[4]["loss"] != rows[5]["loss"]  # with a nonzero SSM output, N matters


def test_upper_bound_equals_a_retrofit_whose_window_holds_the_sequence(rows, folders, task, tmp_path):
    """Widening the window of a loaded folder == retrofitting the source with window T (nothing evicted)."""
    import sleep_torch
    from common.training import EVAL_SEED
    from convert.retrofit import retrofit
    from sleep_torch.train import evaluate

    big = tmp_path / "big"
    retrofit(folders["gguf"], big, window=task.seq_len, passes=1, insert=1, backend="torch")
    ref = evaluate(sleep_torch.load(big), task, N, EVAL_SEED, passes=1)  # the same examples (run_eval's seed)
    np.testing.assert_allclose(rows[0]["loss"], ref["loss"], rtol=1e-5)
    assert rows[0]["acc"] == ref["acc"]


def test_numbers_equal_lmsleep_eval(rows, folders, tmp_path):
    from click.testing import CliRunner

    from lmsleep.cli import cli

    args = [f"--task-arg={k}={json.dumps(v)}" for k, v in TASK_ARGS.items()]
    args += [f"--task-arg=tokenizer_dir={folders['retrofit']}", "--n", str(N), "--backend", "torch"]
    out = tmp_path / "n2.json"
    result = CliRunner().invoke(cli, ["eval", str(folders["n2"]), "--task", "recall", *args, "--passes", "1",
                                      "--passes", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    ref = json.loads(out.read_text())["results"]
    mine = [r for r in rows if r["model"] == "trained N=2"]
    for a, b in zip(ref, mine):
        assert {k: b[k] for k in a} == a

    table, plot = tmp_path / "t.json", tmp_path / "t.png"
    result = CliRunner().invoke(cli, ["sleep-eval", "--task", "recall", *args, "--retrofit", str(folders["retrofit"]),
                                      "--trained", str(folders["n1"]), "--passes", "1", "--json", str(table),
                                      "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    got = json.loads(table.read_text())["results"]
    assert [r["model"] for r in got] == ["whole context", "evicted, untrained", "trained N=1"]
    assert got[2]["loss"] == rows[2]["loss"] and "acc_k2" in result.output
    pytest.importorskip("matplotlib")
    assert plot.stat().st_size > 0


def test_markdown_table(rows):
    from lmsleep.sleepeval import markdown_table

    lines = markdown_table(rows).splitlines()
    assert lines[0].startswith("| model | window | trained_passes | passes | acc_k1 | acc_k2 | acc |")
    assert len(lines) == 2 + len(rows) and "| whole context | 192 | - | 1 |" in lines[2]


def test_eval_batch_keeps_predictions_only_and_gives_the_same_scores(rows, folders, task):
    from lmsleep.sleepeval import folder_rows

    chunked = folder_rows("torch", "trained N=2", folders["n2"], task, (1, 2), n=N, seed=1, eval_batch=4)
    for a, b in zip(chunked, [r for r in rows if r["model"] == "trained N=2"]):
        np.testing.assert_allclose(a.pop("loss"), b["loss"], rtol=1e-6)
        assert a == {k: v for k, v in b.items() if k != "loss"}


def test_whole_trained_adds_each_trained_folder_without_eviction(folders, task):
    from lmsleep.sleepeval import sleep_eval, whole_context_row

    rows = sleep_eval("torch", task, retrofit=folders["retrofit"], trained=[folders["n2"]], passes=(2,), n=N,
                      whole_trained=True)
    assert [r["model"] for r in rows] == ["whole context", "evicted, untrained", "trained N=2",
                                          "trained N=2, whole context"]
    last = rows[-1]
    assert last["window"] == task.seq_len and last["eviction"] == "none" and last["trained_passes"] == 2
    assert last["loss"] == whole_context_row("torch", folders["n2"], task, n=N, seed=1)["loss"]
    assert last["loss"] != rows[0]["loss"]  # the trained SSM blocks write into the residual stream
