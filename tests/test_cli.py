"""The lmsleep CLI through click's CliRunner: every command, and user mistakes exit 2 in one line."""

import json
import threading

import numpy as np
import pytest
from click.testing import CliRunner

from common.config import ModelConfig
from common.tokenizers import ByteTokenizer
from common.training import METRICS_FILE, read_metrics
from lmsleep.cli import cli

torch = pytest.importorskip("torch")
from sleep_torch import HybridLM, load, save  # noqa: E402


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """An untrained byte-level model folder (window 16) with its tokenizer."""
    path = tmp_path_factory.mktemp("m") / "model"
    cfg = ModelConfig.from_name("debug", vocab_size=ByteTokenizer().vocab_size, window=16, sleep_passes=2)
    save(HybridLM(cfg, seed=0), path, tokenizer=ByteTokenizer().to_dict())
    return path


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def assert_user_error(result, needle):
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("Error")]
    assert len(lines) == 1


@pytest.mark.parametrize("command", ["train", "eval", "generate", "chat", "data", "presets", "demo"])
def test_every_command_has_help_with_an_example(command):
    result = run(command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.output or command == "demo"


def test_presets_and_data():
    assert "paper-rule110" in run("presets").output
    assert json.loads(run("presets", "debug").output)["model"]["d_model"] == 32
    out = run("data", "rule110", "--n", "1", "--set", "steps=1").output
    assert "w4  | |[" in out  # the query window with its answers marked
    assert_user_error(run("data", "nope"), "unknown task 'nope'")
    assert_user_error(run("presets", "huge"), "unknown preset 'huge'")


def test_train_eval_generate_round_trip(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--task", "rule110", "--task-arg", "width=8", "--task-arg", "states=2", "--task-arg", "steps=0",
            "--preset", "debug", "--steps", "4", "--set", "eval_interval=2", "--set", "batch_size=4", "--passes", "2",
            "--out", out, "--quiet", "--backend", "torch"]
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["step"] == 4
    result = run("eval", out / "model", "--passes", "1", "--passes", "3", "--n", "16", "--json", tmp_path / "e.json",
                 "--backend", "torch")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "e.json").read_text())["results"]
    assert [r["passes"] for r in rows] == [1, 3] and all(0 <= r["exact"] <= 1 for r in rows)
    result = run("generate", out / "model", "--prompt", "0110", "--max-tokens", "5", "--backend", "torch")
    assert result.exit_code == 0, result.output
    assert set(result.output.split("[")[0].strip()) <= {"0", "1", "|"}
    # mistakes
    assert_user_error(run("generate", out / "model", "--prompt", "01x", "--backend", "torch"), "'x'")
    assert_user_error(run("generate", out / "model", "--prompt", "", "--backend", "torch"), "empty prompt")
    assert_user_error(run(*args), "already exists")  # same --out without --resume
    assert_user_error(run("generate", tmp_path / "missing", "--prompt", "0"), "not a model folder")
    assert_user_error(run("train", "--task", "rule110", "--preset", "debug", "--set", "bogus=1", "--out", tmp_path / "x"),
                      "unknown config field 'bogus'")
    assert_user_error(run("train", "--task", "nope", "--out", tmp_path / "y"), "unknown task")


def test_resume_of_another_backends_checkpoint_is_refused(tmp_path):
    pytest.importorskip("mlx.core")
    out = tmp_path / "run"
    base = ["train", "--task", "rule110", "--task-arg", "width=8", "--task-arg", "states=2", "--preset", "debug",
            "--set", "batch_size=4", "--set", "eval_interval=0", "--out", out, "--quiet"]
    assert run(*base, "--steps", "2", "--backend", "mlx").exit_code == 0
    assert_user_error(run(*base, "--steps", "4", "--resume", "--backend", "torch"), "mlx")


def test_chat_scripted_session_sleeps_saves_and_reloads_identically(text_model, tmp_path):
    memory = tmp_path / "mem.safetensors"
    turns = ["hello there, sleepy model", "tell me about windows", "/stats", f"/save {memory}"]
    flags = ["--max-tokens", "12", "--backend", "torch"]
    first = run("chat", text_model, *flags, input="\n".join(turns + ["what now?", "/stats", "/quit"]) + "\n")
    assert first.exit_code == 0, first.output
    stats = [ln for ln in first.output.splitlines() if ln.startswith("[tokens seen")]
    seen = int(stats[0].split()[2].rstrip(","))
    assert seen > 3 * 16 and int(stats[0].split()[4].rstrip(",")) >= 3  # > 3 windows, several sleeps
    assert "[memory saved" in first.output
    second = run("chat", text_model, *flags, input=f"/load {memory}\nwhat now?\n/stats\n/quit\n")
    assert second.exit_code == 0, second.output
    reply_first = first.output.split("[memory saved")[1].splitlines()[1:]
    reply_second = second.output.split("[memory loaded")[1].splitlines()[1:]
    assert reply_first == reply_second  # the reloaded memory continues exactly (reply and stats)
    bad = run("chat", text_model, *flags, input="/load nowhere.safetensors\n/quit\n")
    assert "error: nowhere.safetensors: no such memory file" in bad.output and bad.exit_code == 0


def test_due_sleep_runs_on_a_thread_between_turns_and_is_joined_before_the_next_input(text_model):
    from lmsleep import workflows as wf
    from lmsleep.chat import ChatSession

    b, model, tok = wf.load_for_generation("torch", text_model)
    events = []
    real_sleep = model.sleep

    def recording_sleep(state, **kw):
        events.append(("sleep", threading.current_thread() is threading.main_thread(), state.due))
        return real_sleep(state, **kw)

    model.sleep = recording_sleep
    session = ChatSession(model, tok, b.generate, sampling=dict(max_tokens=1), stop=[], no_grad=b.no_grad,
                          echo=lambda text, nl=True: None)
    session.reply("x" * 14)  # 15 prompt tokens + 1 reply token fill the 16-token window: a sleep is due
    assert session.sleeper is not None  # started right after the reply, off the reply path
    session.handle("/stats")  # the next input joins it first
    assert session.sleeper is None and session.state.due == 0 and session.state.sleeps == 1
    assert events == [("sleep", False, 2)]  # ran once, on the background thread, with the window's N


def test_chat_refuses_a_memory_file_of_another_model(text_model, tmp_path):
    other = tmp_path / "other"
    cfg = ModelConfig.from_name("debug", vocab_size=ByteTokenizer().vocab_size, window=16, sleep_passes=2)
    model = HybridLM(cfg, seed=1)
    save(model, other, tokenizer=ByteTokenizer().to_dict())
    _, state = model.step(torch.tensor([[1, 2, 3]]), model.new_state(1))
    model.save_state(state, tmp_path / "other.safetensors")
    for memory, message in (("other.safetensors", "written by another model"),
                            ("none.safetensors", "no such memory file")):
        result = run("chat", text_model, "--memory", tmp_path / memory, "--backend", "torch", input="/stats\n/quit\n")
        assert result.exit_code == 0 and result.output.count("error: ") == 1 and message in result.output
        assert "[tokens seen 0," in result.output  # reported in one line; the chat goes on from an empty memory
    ok = run("chat", other, "--memory", tmp_path / "other.safetensors", "--backend", "torch", input="/stats\n/quit\n")
    assert ok.exit_code == 0 and "[tokens seen 3," in ok.output


def test_text_training_eval_perplexity_and_generation_stop(tmp_path):
    data = tmp_path / "notes.txt"
    data.write_text("the sleeping model dreams of windows. " * 60)
    out = tmp_path / "run"
    result = run("train", "--task", "text", "--data", data, "--task-arg", "seq_len=48", "--task-arg", "window=16",
                 "--preset", "debug", "--steps", "3", "--set", "batch_size=4", "--set", "eval_interval=0",
                 "--out", out, "--quiet", "--backend", "torch")
    assert result.exit_code == 0, result.output
    result = run("eval", out / "model", "--n", "4", "--json", "-", "--backend", "torch")
    assert result.exit_code == 2 and "outside the model folder" in result.output  # a recorded path is not trusted
    result = run("eval", out / "model", "--n", "4", "--json", "-", "--backend", "torch", "--task-arg", f"path={data}")
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output
    result = run("generate", out / "model", "--prompt", "the ", "--max-tokens", "40", "--verbose", "--backend", "torch")
    assert result.exit_code == 0, result.output
    assert "sleeps" in result.output  # --verbose stats line (stderr is mixed in by CliRunner)


def test_train_nproc_runs_ddp_with_gloo(tmp_path):
    """2 gloo ranks under torchrun, each with half of the global batch (2 micro-batches of 2 rows),
    against one process with all of it: the same losses at every step (the logged loss is averaged
    over the ranks, so a rank whose weights drifted would show from step 2 on) and the same final
    weights (rank 0's: only rank 0 writes)."""
    args = ["train", "--task", "rule110", "--task-arg", "width=8", "--task-arg", "states=2", "--preset", "debug",
            "--steps", "3", "--grad-accum", "2", "--set", "batch_size=8", "--set", "eval_interval=0",
            "--set", "log_interval=1", "--quiet", "--backend", "torch"]
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    result = run(*args, "--nproc", "2", "--out", ddp)
    assert result.exit_code == 0, result.output
    assert (ddp / "model" / "config.json").is_file() and (ddp / "checkpoint").is_dir()
    result = run(*args, "--out", single)
    assert result.exit_code == 0, result.output
    losses = {d: [r["loss"] for r in read_metrics(d / METRICS_FILE)] for d in (ddp, single)}
    assert len(losses[ddp]) == 3
    np.testing.assert_allclose(losses[ddp], losses[single], rtol=1e-5)
    one = dict(load(single / "model").named_parameters())
    for name, p in load(ddp / "model").named_parameters():
        torch.testing.assert_close(p, one[name], atol=1e-5, rtol=1e-4, msg=name)


def test_demo_trains_both_n_and_prints_the_table(tmp_path, monkeypatch):
    from lmsleep import workflows

    train = workflows.run_train

    def small_evals(backend, task, mc, tc, out, **kwargs):  # 8 eval examples instead of 256: most of the time
        return train(backend, task, mc, tc.replace(eval_samples=8), out, **kwargs)

    monkeypatch.setattr(workflows, "run_train", small_evals)
    result = run("demo", "--steps", "2", "--batch-size", "4", "--out", tmp_path / "demo", "--backend", "torch")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert [r["N"] for r in rows] == [1, 4] and all(0 <= r["exact"] <= 1 for r in rows)
    assert "majority_exact" in result.output and "wall_s" in result.output
    assert "lmsleep chat" in result.output and "lmsleep convert" in result.output


@pytest.mark.parametrize("command", ["generate", "convert"])
def test_a_bad_dtype_is_a_one_line_error(text_model, tmp_path, command):
    args = ["--prompt", "hi"] if command == "generate" else [tmp_path / "out", "--to", "torch"]
    result = run(command, text_model, *args, "--dtype", "float8")
    assert_user_error(result, "'float8'")


def test_a_bad_dtype_in_library_code_is_a_value_error_naming_it():
    from common.checkpoint import check_dtype

    assert check_dtype("bfloat16") == "bfloat16" and check_dtype(None) is None
    with pytest.raises(ValueError, match="got 'float8'"):
        check_dtype("float8")


def test_nproc_with_a_single_device_backend_is_a_one_line_error(monkeypatch):
    import dataclasses

    from common import backends

    monkeypatch.setitem(backends.BACKENDS, "torch", dataclasses.replace(backends.BACKENDS["torch"], distributed=False))
    result = run("train", "--task", "rule110", "--preset", "debug", "--nproc", "2", "--out", "x", "--backend", "torch")
    assert_user_error(result, "--nproc needs a backend that trains over several processes")


def test_an_internal_key_error_is_not_swallowed(monkeypatch):
    from common.config import ModelConfig

    def broken(name, **overrides):
        raise KeyError("internal")

    monkeypatch.setattr(ModelConfig, "from_name", staticmethod(broken))
    result = run("presets", "debug")
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)  # a bug: traceback, not exit 2


def test_presets_lists_and_prints_train_only_presets():
    listing = run("presets")
    assert listing.exit_code == 0 and "retrofit" in listing.output
    shown = run("presets", "retrofit")
    assert shown.exit_code == 0
    doc = json.loads(shown.output)
    assert set(doc) == {"train"} and doc["train"]["freeze"] == "base"
    assert_user_error(run("presets", "nope"), "unknown preset")
