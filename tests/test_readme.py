"""The README's Mac session, run line by line with --backend mlx (MLX's CPU build on Linux).

Only sizes change: the step count is cut to a few, and paths point into a temporary folder.
"""

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from lmsleep.cli import cli
from tests.retrofit.conftest import tiny_bpe, tiny_gguf  # noqa: F401 (fixtures for the retrofit session)

pytest.importorskip("mlx.core")
pytest.importorskip("torch")
README = Path(__file__).resolve().parents[1] / "README.md"


def mac_session_lines() -> list[str]:
    text = README.read_text()
    block = re.search(r"<!-- mac-session.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.strip().splitlines()]


def test_readme_mac_session_runs_with_mlx(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("notes.txt").write_text("Sleep writes each window into the fast weights. " * 80)
    lines = mac_session_lines()
    assert [ln.split()[1] for ln in lines] == ["train", "chat", "convert", "parity", "convert"]
    for line in lines:
        args = shlex.split(line)[1:]
        if args[0] == "train":
            args[args.index("--steps") + 1] = "3"
            args += ["--task-arg", "seq_len=64", "--set", "batch_size=4", "--set", "eval_interval=0", "--quiet"]
        stdin = "hello\n/sleep\n/save mem.safetensors\n/stats\n/quit\n" if args[0] == "chat" else None
        if args[0] == "chat":
            args += ["--max-tokens", "8"]
        result = CliRunner().invoke(cli, args, input=stdin)
        assert result.exit_code == 0, f"{line}\n{result.output}"
    assert Path("mem.safetensors").is_file()
    assert Path("runs/notes-torch/config.json").is_file() and Path("runs/notes-q4/config.json").is_file()


def retrofit_session_lines() -> list[str]:
    block = re.search(r"<!-- retrofit-session.*?```bash\n(.*?)```", README.read_text(), re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.strip().splitlines()]


def test_readme_retrofit_session_runs(tmp_path, monkeypatch, tiny_gguf):
    """The retrofit lines, with a tiny GGUF (written by tests/retrofit/conftest.py) as the source."""
    _, gguf_path = tiny_gguf
    monkeypatch.chdir(tmp_path)
    lines = retrofit_session_lines()
    assert [ln.split()[1] for ln in lines] == ["retrofit", "chat", "generate", "parity"]
    for line in lines:
        args = [str(gguf_path) if a == "smollm2-135m-instruct" else a for a in shlex.split(line)[1:]]
        if args[0] == "retrofit":
            args += ["--backend", "torch"]
        if args[0] in ("chat", "generate"):
            args += ["--backend", "torch", "--max-tokens", "4"][: 4 if args[0] == "chat" else 2]
        stdin = "What is the capital of France?\n/stats\n/quit\n" if args[0] == "chat" else None
        result = CliRunner().invoke(cli, args, input=stdin)
        assert result.exit_code == 0, f"{line}\n{result.output}"
    assert Path("runs/smol/chat_template.jinja").is_file()
    # the README's Python generation snippet prints what `lmsleep generate` prints for the same prompt
    import contextlib
    import io

    snippet = re.search(r"<!-- generate-python.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, "README.md", "exec"), {})
    cli_run = CliRunner().invoke(cli, ["generate", "runs/smol", "--prompt", "The capital of France is",
                                       "--max-tokens", "8", "--backend", "torch"])
    assert cli_run.exit_code == 0 and printed.getvalue().strip()
    assert printed.getvalue().strip() in cli_run.output


def test_readme_serve_session_runs(tmp_path, tiny_gguf):
    """`lmsleep serve` in a subprocess (the README's command on a tiny retrofitted model, port 0), then
    the README's openai snippet against it."""
    import os
    import signal
    import subprocess
    import sys

    pytest.importorskip("openai")
    from convert.retrofit import retrofit

    text = README.read_text()
    command = re.search(r"<!-- serve-session.*?```bash\n(.*?)```", text, re.S).group(1).strip()
    snippet = re.search(r"<!-- serve-session.*?```python\n(.*?)```", text, re.S).group(1)
    model = tmp_path / "runs" / "smol"
    retrofit(tiny_gguf[1], model, window=16, passes=2, insert=1)
    args = [a.replace("8000", "0") for a in shlex.split(command)[2:]] + ["--backend", "torch", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lmsleep.cli", "serve", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # "serving smol at http://127.0.0.1:PORT ..."
        url = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert url, line + proc.stderr.read()
        client_code = snippet.replace("http://127.0.0.1:8000", url.group(0))
        out = subprocess.run([sys.executable, "-c", client_code], capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip()  # the reply's text
        assert (tmp_path / "runs" / "smol-sessions").is_dir()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
