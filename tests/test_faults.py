"""Crash safety: a process killed at any step of a folder replacement leaves a complete copy (old or
new) that the next reader finds, leftovers are cleaned, and a torn metrics.jsonl line does not
block a resume (docs/FORMAT.md "Crash-safe writes")."""

import json
import os
import sys

import numpy as np
import pytest

from common import checkpoint as ckpt
from common import training as tr
from common.config import ModelConfig

STEPS = ["writing", "written", "synced", "sealed", "moved-old", "placed", "removed-old"]
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill is a forked child's os._exit")


def killed_at(step: str, write) -> bool:
    """Run write() in a forked child that dies (os._exit, no cleanup) when atomic_folder reaches `step`;
    'writing' kills it half-way through writing the temporary folder. False: the step never came."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        def hook(name):
            if name == step:
                os._exit(9)

        ckpt.crash_hook = hook
        try:
            write(kill_while_writing=step == "writing")
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) in (0, 9)
    return os.WEXITSTATUS(status) == 9


def write_versioned(path, version: int, *, kill_while_writing=False):
    """A folder whose two files both name `version` (complete = both present and equal)."""
    with ckpt.atomic_folder(path, overwrite=True) as tmp:
        (tmp / "a.txt").write_text(str(version))
        if kill_while_writing:
            os._exit(9)
        (tmp / "b.txt").write_text(str(version))


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("existed", [True, False], ids=["replace", "create"])
@pytest.mark.parametrize("step", STEPS)
def test_kill_at_every_step_of_a_folder_replacement(tmp_path, step, existed):
    path = tmp_path / "x"
    if existed:
        write_versioned(path, 1)
    killed = killed_at(step, lambda **kw: write_versioned(path, 2, **kw))
    assert killed == (existed or step != "moved-old")  # creating X moves no old copy away
    ckpt.recover_folder(path)  # what every reader and writer runs first
    if not existed and step in ("writing", "written", "synced"):
        assert not path.exists()  # never complete: nothing appears
    else:
        a, b = (path / "a.txt").read_text(), (path / "b.txt").read_text()
        assert a == b and a in (("1", "2") if existed else ("2",)), (step, a, b)
        if step in ("placed", "removed-old") or (step in ("sealed", "moved-old") and not existed):
            assert a == "2"
    assert leftovers(tmp_path) == []
    write_versioned(path, 3)  # and the next write works
    assert (path / "a.txt").read_text() == "3" and leftovers(tmp_path) == []


def small_config():
    return ModelConfig.from_name("debug", vocab_size=5, window=4, pattern="AS", n_layers=2)


def write_training_checkpoint(folder, step: int, **kw):
    """A real training checkpoint (common.training.write_checkpoint) with numpy safetensors."""
    from safetensors.numpy import save_file

    config = small_config()
    weights = {n: np.full(s, step, np.float32) for n, s in ckpt.param_shapes(config).items()}
    state = {"format": tr.TRAINER_FORMAT, "format_version": tr.TRAINER_FORMAT_VERSION, "backend": "torch",
             "step": step, "rng": {}, "elapsed": 0.0, "model": config.to_dict(), "train": {}, "task": {},
             "metrics": {}}
    steps = {"muon": 0, "adamw": 0}

    def save(path, tensors, meta):
        if kw.get("kill_while_writing") and path.name == tr.OPTIMIZER_FILE:
            os._exit(9)
        save_file(tensors, str(path), metadata=meta)

    tr.write_checkpoint(folder, "torch", config, None, state, weights, {}, tr.optimizer_document(config, steps), save)


@pytest.mark.parametrize("step", STEPS)
def test_killed_checkpoint_write_resumes_from_a_complete_checkpoint(tmp_path, step):
    folder = tmp_path / tr.CHECKPOINT_DIR
    write_training_checkpoint(folder, 5)
    killed_at(step, lambda **kw: write_training_checkpoint(folder, 6, **kw))
    state, _ = tr.read_checkpoint(folder, "torch")  # the resume path: recovers, then reads
    _, _, where = ckpt.validate_folder(folder)
    assert state["step"] in (5, 6)
    from safetensors.numpy import load_file

    assert load_file(str(where["embed.weight"]))["embed.weight"][0, 0] == state["step"]
    assert leftovers(tmp_path) == []


def test_reader_of_a_model_folder_recovers_it(tmp_path):
    folder = tmp_path / "model"
    write_training_checkpoint(folder, 1)
    killed_at("moved-old", lambda **kw: write_training_checkpoint(folder, 2, **kw))
    assert not folder.exists()
    config, _ = ckpt.read_config(folder)  # the loaders' first call puts the new copy back
    assert config == small_config() and tr.read_trainer_state(folder, None)["step"] == 2


def test_leftover_temporary_files_are_cleaned(tmp_path):
    target = tmp_path / "f.json"
    dead = tmp_path / f".f.json.tmp-{2**22 + 12345}-abc"  # a pid above any pid_max: that process is gone
    dead.write_text("half")
    alive = tmp_path / f".f.json.tmp-{os.getppid()}-abc"  # a running process may still be writing it
    alive.write_text("busy")
    ckpt.write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert not dead.exists() and alive.exists()


# --- metrics.jsonl ---------------------------------------------------------------------------------

def test_torn_last_metrics_line_is_dropped_on_resume(tmp_path, capsys):
    path = tmp_path / tr.METRICS_FILE
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    assert [r["step"] for r in tr.read_metrics(path)] == [1, 2, 3]
    tr.MetricsLog(path, resume_step=2)
    assert [r["step"] for r in tr.read_metrics(path)] == [1, 2]
    assert "torn" in capsys.readouterr().err


def test_bad_middle_metrics_line_names_the_file(tmp_path):
    path = tmp_path / tr.METRICS_FILE
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=f"{path}:2"):
        tr.MetricsLog(path, resume_step=3)
    with pytest.raises(ValueError, match=f"{path}:2"):
        tr.read_metrics(path)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


# --- kill -9 of real commands ----------------------------------------------------------------------
# Subprocesses killed with SIGKILL at seeded random instants (no timing is asserted): a killed
# `lmsleep train` resumed with --resume ends where an uninterrupted run ends, bit for bit (torch,
# CPU, one thread); a killed `lmsleep convert` leaves no destination or a complete one.
import random  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

KILLS = 5
TRAIN = ["train", "--task", "rule110", "--task-arg", "width=8", "--task-arg", "states=2", "--task-arg", "steps=0",
         "--preset", "debug", "--steps", "12", "--set", "batch_size=4", "--set", "save_interval=1",
         "--set", "log_interval=1", "--set", "eval_interval=0", "--quiet", "--backend", "torch"]


def lmsleep(*args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lmsleep.cli", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(proc) -> None:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]


def logged_steps(out) -> int:
    path = out / tr.METRICS_FILE
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def tensors(path):
    from safetensors.numpy import load_file

    return load_file(str(path))


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_kill_9_during_training_then_resume_matches_an_uninterrupted_run(tmp_path):
    pytest.importorskip("torch")
    rng = random.Random(13)
    ref = tmp_path / "ref"
    finish(lmsleep(*TRAIN, "--out", ref))
    out = tmp_path / "killed"
    kills = 0
    for i in range(KILLS):
        proc = lmsleep(*TRAIN, "--out", out, *(["--resume"] if i else []))
        start = logged_steps(out)
        while proc.poll() is None and logged_steps(out) < start + 2:  # let it train a little: kills land mid-run
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.15))  # then somewhere: a step, a checkpoint or model write, the metrics line
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.wait()
    finish(lmsleep(*TRAIN, "--out", out, "--resume"))
    assert kills >= 3  # most runs were cut short (a run may finish first on a fast machine)
    for name in (f"{tr.CHECKPOINT_DIR}/{ckpt.WEIGHTS_FILE}", f"{tr.CHECKPOINT_DIR}/{tr.OPTIMIZER_FILE}",
                 f"{tr.MODEL_DIR}/{ckpt.WEIGHTS_FILE}"):
        a, b = tensors(ref / name), tensors(out / name)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name
    losses = [[(r["step"], r["loss"]) for r in tr.read_metrics(run / tr.METRICS_FILE)] for run in (ref, out)]
    assert losses[0] == losses[1] and len(losses[0]) == 12
    assert leftovers(out) == [] and leftovers(out / tr.CHECKPOINT_DIR) == []


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_kill_9_during_convert_leaves_no_destination_or_a_complete_one(tmp_path):
    torch = pytest.importorskip("torch")
    from sleep_torch import HybridLM, load, save

    src, dst = tmp_path / "src", tmp_path / "dst"
    config = ModelConfig.from_name("debug", vocab_size=8192, window=8, d_model=256)  # 10 MB: writing takes a while
    save(HybridLM(config, seed=0), src)
    copies = {"float32": tensors(src / ckpt.WEIGHTS_FILE)}  # the old copy (bit for bit) or the new one (bf16)
    copies["bfloat16"] = {n: torch.from_numpy(a).bfloat16().float().numpy() for n, a in copies["float32"].items()}
    rng, outcomes = random.Random(7), []  # what each kill left: none, the old (float32) or the new (bfloat16)
    for i in range(KILLS):
        if i == 1 and not dst.exists():  # from now on --force replaces a complete float32 copy
            finish(lmsleep("convert", src, dst, "--to", "torch"))
        existed = dst.exists()
        proc = lmsleep("convert", src, dst, "--to", "torch", "--force", "--dtype", "bfloat16")
        while proc.poll() is None and not any(p.name.startswith(f".{dst.name}.") for p in tmp_path.iterdir()):
            time.sleep(0.001)  # until the new copy starts to appear, then at a random instant of its writing
        time.sleep(rng.uniform(0, 0.05))
        proc.kill()
        proc.wait()
        try:
            model = load(dst)  # recovers an interrupted replacement first
        except ckpt.CheckpointError:
            assert not existed and not dst.exists()  # never complete, so never there
            outcomes.append("none")
            continue
        got = {n: p.detach().float().numpy() for n, p in model.named_parameters()}
        dtype = str(model.embed.weight.dtype).rsplit(".", 1)[-1]
        assert all(np.array_equal(got[n], copies[dtype][n]) for n in copies[dtype]), dtype
        assert not any(p.name.startswith(f".{dst.name}.") for p in tmp_path.iterdir())  # leftovers cleaned
        outcomes.append(dtype)
        if dtype == "bfloat16" and i < KILLS - 1:  # put the old copy back for the next kill
            finish(lmsleep("convert", src, dst, "--to", "torch", "--force"))
