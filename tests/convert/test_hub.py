"""Hub push/pull against a fake local transport: never the network."""

import shutil
from pathlib import Path

import pytest

from common import checkpoint as ckpt
from common.config import ModelConfig
from convert import hub


@pytest.fixture
def model_dir(tmp_path):
    pytest.importorskip("torch")
    from sleep_torch import HybridLM, save

    save(HybridLM(ModelConfig.from_name("debug")), tmp_path / "model")
    return tmp_path / "model"


class FakeHub:
    """Stands in for HfApi + snapshot_download: repos are folders under `root`."""

    def __init__(self, root: Path):
        self.root, self.calls = root, []

    def create_repo(self, repo_id, token=None, private=False, exist_ok=False):
        self.calls.append(("create", repo_id, token, private))
        (self.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)

    def upload_folder(self, *, repo_id, folder_path, token=None, allow_patterns=None, commit_message=None):
        self.calls.append(("upload", repo_id, token, commit_message))
        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)

    def download(self, repo_id, *, revision=None, local_dir, token=None, allow_patterns=None, local_files_only=False):
        self.calls.append(("download", repo_id, token, local_files_only))
        if not (self.root / repo_id).is_dir():
            raise FileNotFoundError(f"Repository Not Found for {repo_id}")
        shutil.copytree(self.root / repo_id, local_dir, dirs_exist_ok=True)
        return local_dir


def test_push_then_pull_round_trip(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    fake = FakeHub(tmp_path / "hub")
    hub.push(model_dir, "me/sleepy", api=fake)
    out = hub.pull("me/sleepy", tmp_path / "pulled", download=fake.download)
    assert ckpt.read_config(out)[0] == ckpt.read_config(model_dir)[0]
    assert (out / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    assert [c[2] for c in fake.calls] == ["hf_test"] * 3  # HF_TOKEN used for every call


def test_offline_mode(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake = FakeHub(tmp_path / "hub")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        hub.push(model_dir, "me/sleepy", api=fake)
    (tmp_path / "hub" / "me").mkdir(parents=True)
    shutil.copytree(model_dir, tmp_path / "hub" / "me" / "cached")
    hub.pull("me/cached", tmp_path / "pulled", download=fake.download)
    assert fake.calls[-1][3] is True  # local_files_only under HF_HUB_OFFLINE


def test_pull_errors_leave_nothing_behind(tmp_path):
    fake = FakeHub(tmp_path / "hub")
    with pytest.raises(ValueError, match="could not download 'me/missing'"):
        hub.pull("me/missing", tmp_path / "pulled", download=fake.download)
    assert not (tmp_path / "pulled").exists()
    (tmp_path / "hub" / "me" / "junk").mkdir(parents=True)
    (tmp_path / "hub" / "me" / "junk" / "config.json").write_text('{"format": "other"}')
    with pytest.raises(ckpt.CheckpointError, match="format"):
        hub.pull("me/junk", tmp_path / "pulled", download=fake.download)
    assert not (tmp_path / "pulled").exists()


def test_push_refuses_invalid_folder(tmp_path):
    with pytest.raises(ckpt.CheckpointError):
        hub.push(tmp_path, "me/x", api=FakeHub(tmp_path / "hub"))


def test_cli_hub_errors_are_one_line(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from lmsleep.cli import cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(cli, ["hub", "pull", "me/not-cached", str(tmp_path / "out")])
    assert result.exit_code == 2 and "could not download 'me/not-cached'" in result.output
    result = CliRunner().invoke(cli, ["hub", "push", str(tmp_path), "me/x"])
    assert result.exit_code == 2 and "config.json" in result.output
    assert CliRunner().invoke(cli, ["hub", "push", "--help"]).exit_code == 0
