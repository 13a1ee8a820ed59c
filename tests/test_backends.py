"""The backend table (common/backends.py): lookup, `auto`, the CLI's choices, the framework calls.

A fake third backend added to the table must be offered by every `--backend` (and `convert --to`),
and, when it points at a real package, run through the benchmarks and `load_backend` unchanged:
callers read the table and never branch on a backend's name.
"""

import dataclasses
import importlib.util
import subprocess
import sys

import click
import numpy as np
import pytest
from click.testing import CliRunner

from common import backends
from lmsleep.backends import load_backend
from lmsleep.cli import cli

INSTALLED = [pytest.param(name, marks=pytest.mark.skipif(importlib.util.find_spec(name) is None,
                                                           reason=f"{name} is not installed"))
             for name in ("torch", "mlx")]


def fake(**changes):
    """A third entry: torch's calls under another name (package and framework as given)."""
    return dataclasses.replace(backends.BACKENDS["torch"], **{"name": "fake", "extra": "fake", **changes})


def commands(group: click.Group, path=()):
    """Every (command path, command) below a click group."""
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from commands(command, path + (name,))
        else:
            yield path + (name,), command


def backend_option(command):
    return next((p for p in command.params if p.name in ("backend", "to")), None)


def one_error_line(result) -> str:
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("Error")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_table_names_and_choices():
    assert backends.names() == ("torch", "mlx")
    assert backends.choices() == ("auto", "torch", "mlx")
    for b in backends.BACKENDS.values():
        assert b.devices[0] == "cpu" and b.package == f"sleep_{b.name}"


def test_unknown_backend_is_a_one_line_value_error():
    with pytest.raises(ValueError, match=r"^unknown backend 'nope' \(choose from auto, torch, mlx\)$"):
        backends.resolve("nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        load_backend("nope")


def test_auto_picks_the_first_installed_backend_that_prefers_this_machine(monkeypatch):
    mlx = backends.BACKENDS["mlx"]
    monkeypatch.setitem(backends.BACKENDS, "mlx", dataclasses.replace(mlx, preferred=lambda: True, framework="json"))
    assert backends.resolve("auto") == "mlx"
    monkeypatch.setitem(backends.BACKENDS, "mlx", dataclasses.replace(mlx, preferred=lambda: True,
                                                                      framework="no_such_framework"))
    assert backends.resolve("auto") == backends.DEFAULT == "torch"  # preferred but not installed
    monkeypatch.setitem(backends.BACKENDS, "mlx", dataclasses.replace(mlx, preferred=lambda: False, framework="json"))
    assert backends.resolve("auto") == "torch"


def test_a_fake_backend_is_offered_by_every_backend_option(monkeypatch):
    monkeypatch.setitem(backends.BACKENDS, "fake", fake(framework="no_such_framework"))
    found = 0
    for path, command in commands(cli):
        option = backend_option(command)
        if option is None:
            continue
        found += 1
        assert "fake" in option.type.choices, path
        result = CliRunner().invoke(cli, [*path, "--help"])
        assert result.exit_code == 0 and "|fake]" in result.output, (path, result.output)
    assert found >= 9  # train, eval, generate, chat, demo, convert --to, bench scan/decode/sleep/train


def test_backend_errors_on_the_command_line_are_one_line(monkeypatch):
    monkeypatch.setitem(backends.BACKENDS, "fake", fake(framework="no_such_framework"))
    result = CliRunner().invoke(cli, ["bench", "scan", "--backend", "fake", "--quick"])
    assert result.exit_code == 2
    assert one_error_line(result) == "Error: backend 'fake' is not installed (pip install 'lm-sleep[fake]')"
    result = CliRunner().invoke(cli, ["bench", "scan", "--backend", "nope"])
    assert result.exit_code == 2 and "'nope'" in one_error_line(result)


def test_a_fake_backend_runs_the_benchmarks_and_loads_without_name_branches(monkeypatch):
    pytest.importorskip("torch")
    from lmsleep.bench import common as bc
    from lmsleep.bench import scan, sleep

    monkeypatch.setitem(backends.BACKENDS, "fake", fake(framework="torch", package="sleep_torch"))
    rt = bc.runtime("fake", threads=1)
    assert (rt.backend, rt.device) == ("fake", "cpu") and rt.pkg.__name__ == "sleep_torch"
    doc = scan.run("fake", quick=True, lengths=(8,), impls=("ref", "chunk"), repeats=1)
    assert doc["backend"] == "fake" and doc["machine"]["backend"] == "fake" and len(doc["rows"]) == 8
    assert doc["targets"] == []  # no speed target is set for an unknown backend
    doc = sleep.run("fake", quick=True, passes=(1,), windows=(8,))
    assert doc["backend"] == "fake" and doc["rows"]
    b = load_backend("fake")
    assert b.name == "fake" and b.train.__name__ == "sleep_torch.train" and callable(b.generate)
    with pytest.raises(ValueError, match="--device 'gpu': the fake backend runs on 'cpu' or 'cuda'"):
        bc.runtime("fake", "gpu")


def test_importing_the_table_and_the_cli_imports_no_framework():
    code = ("import sys; from common import backends; import lmsleep.cli; "
            "backends.choices(); backends.resolve('auto'); [b.installed for b in backends.BACKENDS.values()]; "
            "assert not {'torch', 'mlx'} & set(sys.modules), sorted({'torch', 'mlx'} & set(sys.modules))")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", INSTALLED)
def test_framework_calls(name):
    b = backends.require(name)
    tokens = b.array(np.array([[1, 2, 3]], dtype=np.int64))
    assert b.to_numpy(tokens).tolist() == [[1, 2, 3]]
    assert np.issubdtype(b.to_numpy(tokens).dtype, np.integer)
    x = np.array([1.0, -2.0, 3.0], dtype=np.float32)
    (g,) = b.grad(lambda a: (a * a).sum())(b.array(x, "cpu"))
    np.testing.assert_allclose(b.to_numpy(g), 2 * x)
    with b.no_grad():
        y = b.array(x) * 2
    b.sync(y, "cpu")
    np.testing.assert_array_equal(b.to_numpy(y), 2 * x)
    assert b.default_device() in b.devices and b.device_problem("cpu") is None
    assert isinstance(b.describe("cpu"), dict)
