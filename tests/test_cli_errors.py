"""Every lmsleep command answers a user's mistake with one line on stderr and exit code 2: malformed
flags (click types), bad files and paths (ValueError, OSError), the training NaN stop; never a traceback."""

import os

import pytest
from click.testing import CliRunner

from common.config import MAX_SLEEP_PASSES, ModelConfig
from common.tokenizers import ByteTokenizer
from lmsleep.cli import cli

torch = pytest.importorskip("torch")
from sleep_torch import HybridLM, save  # noqa: E402

R110 = ["--task", "rule110", "--task-arg", "width=8", "--task-arg", "states=2", "--task-arg", "steps=0",
        "--preset", "debug", "--set", "batch_size=4", "--quiet", "--backend", "torch"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    cfg = ModelConfig.from_name("debug", vocab_size=ByteTokenizer().vocab_size, window=16, sleep_passes=2)
    save(HybridLM(cfg, seed=0), root / "model", tokenizer=ByteTokenizer().to_dict())
    (root / "file").write_text("not a folder")
    (root / "dir").mkdir()
    return root


def cases(p):
    """(id, argv, a piece of the expected error line)."""
    m, f, d = str(p / "model"), str(p / "file"), str(p / "dir")
    gen = ["generate", m, "--prompt", "hi", "--backend", "torch"]
    return [
        ("presets-unknown", ["presets", "huge"], "unknown preset"),
        ("data-n-huge", ["data", "rule110", "--n", "100000000"], "--n"),
        ("data-n-negative", ["data", "rule110", "--n", "-1"], "--n"),
        ("data-bad-param", ["data", "rule110", "--set", "width=0"], "width"),
        ("data-seed-negative", ["data", "rule110", "--seed", "-1"], "--seed"),
        ("gen-temp-nan", gen + ["--temp", "nan"], "not a finite number"),
        ("gen-temp-inf", gen + ["--temp", "inf"], "not a finite number"),
        ("gen-temp-negative", gen + ["--temp", "-0.5"], "--temp"),
        ("gen-top-p-zero", gen + ["--top-p", "0"], "--top-p"),
        ("gen-top-p-nan", gen + ["--top-p", "nan"], "not a finite number"),
        ("gen-top-k-negative", gen + ["--top-k", "-1"], "--top-k"),
        ("gen-max-tokens-negative", gen + ["--max-tokens", "-1"], "--max-tokens"),
        ("gen-passes-zero", gen + ["--passes", "0"], "--passes"),
        ("gen-passes-huge", gen + ["--passes", str(MAX_SLEEP_PASSES + 1)], "--passes"),
        ("gen-model-is-a-file", ["generate", f, "--prompt", "hi"], "not a model folder"),
        ("gen-empty-folder", ["generate", d, "--prompt", "hi"], "config.json"),
        ("chat-temp-nan", ["chat", m, "--temp", "nan"], "not a finite number"),
        ("eval-n-zero", ["eval", m, "--n", "0"], "--n"),
        ("eval-no-task", ["eval", m, "--backend", "torch"], "no task recorded"),
        ("train-nproc-zero", ["train", *R110, "--out", str(p / "t1"), "--nproc", "0"], "--nproc"),
        ("train-nproc-huge", ["train", *R110, "--out", str(p / "t2"), "--nproc", str((os.cpu_count() or 1) + 1)],
         "--nproc"),
        ("train-steps-zero", ["train", *R110, "--out", str(p / "t3"), "--steps", "0"], "--steps"),
        ("train-passes-huge", ["train", *R110, "--out", str(p / "t4"), "--passes", str(MAX_SLEEP_PASSES + 1)],
         "--passes"),
        ("train-out-under-a-file", ["train", *R110, "--steps", "1", "--out", f + "/run"], "file"),
        ("train-bad-field", ["train", *R110, "--out", str(p / "t5"), "--set", "bogus=1"], "bogus"),
        ("train-nan-stop", ["train", *R110, "--steps", "6", "--set", "adamw_lr=1e30", "--set", "muon_lr=1e30",
                            "--set", "grad_clip=0", "--out", str(p / "nan")], "is nan at step"),
        ("convert-dst-under-a-file", ["convert", m, f + "/out", "--to", "torch"], "is a file, not a folder"),
        ("convert-src-missing", ["convert", str(p / "missing"), str(p / "c1"), "--to", "torch"], "missing"),
        ("convert-dst-exists", ["convert", m, d, "--to", "torch"], "already exists"),
        ("parity-tol-nan", ["parity", m, "--tol", "nan"], "not a finite number"),
        ("parity-tokens-zero", ["parity", m, "--tokens", "0"], "--tokens"),
        ("retrofit-source-file", ["retrofit", f, str(p / "r1")], "gguf"),
        ("retrofit-passes-zero", ["retrofit", f, str(p / "r2"), "--passes", "0"], "--passes"),
        ("hub-push-not-a-model", ["hub", "push", f, "me/model"], "not a model folder"),
        ("bench-scan-length-zero", ["bench", "scan", "--length", "0"], "--length"),
        ("bench-decode-window-zero", ["bench", "decode", "--window", "0"], "--window"),
        ("bench-sleep-batch-zero", ["bench", "sleep", "--batch", "0"], "--batch"),
        ("bench-train-threads-zero", ["bench", "train", "--threads", "0"], "--threads"),
        ("demo-steps-zero", ["demo", "--steps", "0"], "--steps"),
        ("demo-out-under-a-file", ["demo", "--steps", "1", "--out", f + "/demo"], "Not a directory"),
    ]


CASE_IDS = [c[0] for c in cases(__import__("pathlib").Path("/x"))]


@pytest.mark.parametrize("case", CASE_IDS)
def test_user_mistake_is_one_line_and_exit_2(paths, case):
    _, argv, needle = next(c for c in cases(paths) if c[0] == case)
    result = CliRunner().invoke(cli, argv, input="")
    assert result.exit_code == 2, (result.output, result.exc_info)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and needle in errors[0], result.output


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_permission_denied_is_one_line(paths):
    locked = paths / "locked"
    locked.mkdir(mode=0o500, exist_ok=True)
    result = CliRunner().invoke(cli, ["convert", str(paths / "model"), str(locked / "out"), "--to", "torch"])
    assert result.exit_code == 2 and "Permission denied" in result.output and "Traceback" not in result.output


def test_an_os_error_on_a_users_path_is_one_line_naming_it(monkeypatch, paths):
    """Whatever the OS refuses (here a permission, simulated so that it also fails as root)."""
    import tempfile

    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    result = CliRunner().invoke(cli, ["convert", str(paths / "model"), str(paths / "c9"), "--to", "torch"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip() == f"Error: {paths}: Permission denied"


def test_internal_bugs_keep_their_traceback(monkeypatch, paths):
    from lmsleep import workflows

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(workflows, "load_for_generation", broken)
    result = CliRunner().invoke(cli, ["generate", str(paths / "model"), "--prompt", "hi"])
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)  # not turned into a user error
