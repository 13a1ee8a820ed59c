"""Fine-tuning a retrofitted folder (`train(init=DIR)`, `lmsleep train --init DIR --freeze ...`), torch and MLX.

A tiny random llama (tests/retrofit/conftest.py) goes through a GGUF file and `convert.retrofit.retrofit` with two
SSM blocks inserted (pattern ASAS); the recall task reads its tokenizer. Window 64: the tiny BPE spends up to 50
tokens on one recall question, so 16-32 would not fit one. Checked: what --freeze base freezes (weights bit-identical,
optimizer state only for the inserted blocks, checkpoints holding only those), that the first window equals the
source model before training and differs only through the inserted blocks after, torch/MLX agreement of the first
losses, resume 2 + 2 = 4 (also across backends through convert), and the one-line refusals.
"""

from __future__ import annotations

import importlib
import json
import shutil

import numpy as np
import pytest

from common import checkpoint as ckpt
from common import training as tr
from common.config import TRAIN_PRESETS
from common.tasks import make
from tests.retrofit.conftest import hf_model, tiny_bpe, write_tiny_gguf  # noqa: F401 (tiny_bpe: a fixture)

pytest.importorskip("transformers")
pytest.importorskip("gguf")

BACKENDS = ["torch", "mlx"]
WINDOW = 64
TASK = dict(window=WINDOW, k=[1, 1], facts=[1, 1])  # two windows: a fact, then its question
TC = TRAIN_PRESETS["retrofit"].replace(batch_size=4, grad_accum=2, steps=4, warmup_steps=2, dtype="float32",
                                       eval_interval=0, save_interval=2, log_interval=1)


def backend(name: str):
    if name == "mlx":
        pytest.importorskip("mlx.core")
    return importlib.import_module(f"sleep_{name}"), importlib.import_module(f"sleep_{name}.train")


def logits(name: str, model, tokens: np.ndarray) -> np.ndarray:
    if name == "torch":
        import torch

        with torch.no_grad():
            return model(torch.from_numpy(tokens).long()).float().numpy()
    import mlx.core as mx

    return np.array(model(mx.array(tokens, dtype=mx.int32)).astype(mx.float32))


def arrays(name: str, model) -> dict[str, np.ndarray]:
    if name == "torch":
        return {n: p.detach().float().numpy() for n, p in model.named_parameters()}
    from mlx.utils import tree_flatten

    return {n: np.array(p) for n, p in tree_flatten(model.parameters())}


def source_model(name: str, folder):
    """The source without the inserted blocks (pattern "AA"): what the retrofit must equal before training."""
    lib, _ = backend(name)
    model = lib.load(folder)
    config, inserted = model.config, json.loads((folder / "config.json").read_text())["retrofit"]["inserted"]
    kept = [i for i in range(config.n_layers) if i not in inserted]
    src = config.replace(n_layers=len(kept), pattern="A" * len(kept), sleep_layers=None)
    weights = {}
    for n, a in arrays(name, model).items():
        if not n.startswith("layers."):
            weights[n] = a
        elif int(n.split(".")[1]) in kept:
            i = int(n.split(".")[1])
            weights[n.replace(f"layers.{i}.", f"layers.{kept.index(i)}.", 1)] = a
    out = lib.HybridLM(src, seed=None)
    out.load_arrays(weights)
    return out


@pytest.fixture(scope="module")
def retro(tmp_path_factory, tiny_bpe):  # noqa: F811 (the fixture imported above)
    """(retrofit folder, inserted blocks) of a tiny random llama with its BPE tokenizer."""
    from convert.retrofit import retrofit

    tmp = tmp_path_factory.mktemp("finetune")
    _, tokens, merges = tiny_bpe
    gguf = write_tiny_gguf(tmp / "tiny.gguf", hf_model("llama", seed=1, vocab_size=len(tokens)), tokens, merges)
    report = retrofit(gguf, tmp / "retro", window=WINDOW, passes=2, insert_at=[1, 2])
    return tmp / "retro", report["inserted"]


def task_for(folder):
    return make("recall", **TASK, tokenizer_dir=str(folder))


@pytest.fixture(scope="module")
def runs(retro, tmp_path_factory):
    """Per backend: 4 steps uninterrupted ("full"), 2 steps then 2 resumed ("split"), the step-2 checkpoint kept."""
    folder, _ = retro
    tmp, out = tmp_path_factory.mktemp("runs"), {}
    for name in BACKENDS:
        try:
            _, train = backend(name)
        except pytest.skip.Exception:
            continue
        full, split = tmp / f"{name}-full", tmp / f"{name}-split"
        train.train(task_for(folder), None, TC, full, init=folder, progress=False)
        train.train(task_for(folder), None, TC, split, init=folder, progress=False, max_steps=2)
        shutil.copytree(split / tr.CHECKPOINT_DIR, tmp / f"{name}-step2")
        train.train(task_for(folder), None, TC, split, init=folder, progress=False, resume=True)
        out[name] = {"full": full, "split": split, "step2": tmp / f"{name}-step2"}
    return out


def losses(out) -> list[float]:
    return [r["loss"] for r in tr.read_metrics(out / tr.METRICS_FILE)]


def trained_names(folder, inserted) -> set[str]:
    config, _ = ckpt.read_config(folder)
    return {n for n in ckpt.param_shapes(config) if int(n.split(".")[1] if n.startswith("layers.") else -1) in inserted}


# --- (a) freeze semantics -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BACKENDS)
def test_freeze_base_keeps_the_base_bit_identical(name, retro, runs):
    folder, inserted = retro
    lib, _ = backend(name)
    before, after = arrays(name, lib.load(folder)), arrays(name, lib.load(runs[name]["full"] / tr.MODEL_DIR))
    trained = trained_names(folder, inserted)
    assert trained and all(n.startswith(("layers.1.", "layers.3.")) for n in trained)
    for n in before:
        if n in trained:
            continue
        assert np.array_equal(before[n], after[n]), f"frozen {n} changed"
    for i in inserted:
        assert np.abs(after[f"layers.{i}.ssm.o_proj.weight"]).max() > 0, "inserted o_proj did not learn"
    changed = [n for n in trained if not np.array_equal(before[n], after[n])]
    assert len(changed) >= len(trained) - 2 * len(inserted)  # all but perhaps some gates barely moved
    # optimizer state exists for the trained parameters only
    doc = json.loads((runs[name]["full"] / tr.CHECKPOINT_DIR / tr.OPTIMIZER_JSON).read_text())
    assert set(doc["muon"]["params"]) | set(doc["adamw"]["params"]) == trained
    opt_names = ckpt.read_header(runs[name]["full"] / tr.CHECKPOINT_DIR / tr.OPTIMIZER_FILE)
    assert {tr.split_optimizer_tensor_name(n)[1] for n in opt_names} == trained


@pytest.mark.parametrize("name", BACKENDS)
def test_frozen_parameters_get_no_optimizer(name, retro):
    """In memory: torch requires_grad False and not in any param group; MLX frozen and never in opt.state."""
    folder, inserted = retro
    lib, train = backend(name)
    model = lib.load(folder)
    ft = tr.fine_tune(folder, TC)
    train.set_trainable(model, ft.trainable)
    optimizers = train.build_optimizers(model, TC)
    batch = task_for(folder).sample(2, 0)
    train.train_step(model, optimizers, batch, TC.replace(grad_accum=1), 0)
    if name == "torch":
        grouped = {id(p) for opt in optimizers.values() for g in opt.param_groups for p in g["params"]}
        names = {n for n, p in model.named_parameters() if id(p) in grouped}
        assert names == set(ft.trainable)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == set(ft.trainable)
    else:
        from mlx.utils import tree_flatten

        stated = {k.rsplit(".", 1)[0] for opt in optimizers.values() for k, _ in tree_flatten(opt.state)
                  if k.startswith("layers.")}
        assert stated == set(ft.trainable)
    assert set(train.trainable_names(model)) == set(ft.trainable)


# --- (b) the first window equals the source until the inserted blocks learn ------------------------------

@pytest.mark.parametrize("name", BACKENDS)
def test_first_window_equals_the_source(name, retro, runs):
    folder, inserted = retro
    lib, _ = backend(name)
    tokens = task_for(folder).sample(3, 5).tokens  # (3, 128): two windows
    src = source_model(name, folder)
    base = lib.load(folder)
    # before training: exactly the source, in the first window and (hard eviction) each window alone
    np.testing.assert_array_equal(logits(name, base, tokens)[:, :WINDOW], logits(name, src, tokens[:, :WINDOW]))
    np.testing.assert_array_equal(logits(name, base, tokens)[:, WINDOW:], logits(name, src, tokens[:, WINDOW:]))
    # after frozen-base training: different, and only through the inserted blocks
    tuned = lib.load(runs[name]["full"] / tr.MODEL_DIR)
    assert not np.array_equal(logits(name, tuned, tokens[:, :WINDOW]), logits(name, src, tokens[:, :WINDOW]))
    weights = arrays(name, tuned)
    for i in inserted:
        weights[f"layers.{i}.ssm.o_proj.weight"] = np.zeros_like(weights[f"layers.{i}.ssm.o_proj.weight"])
    tuned.load_arrays(weights)
    np.testing.assert_array_equal(logits(name, tuned, tokens[:, :WINDOW]), logits(name, src, tokens[:, :WINDOW]))


# --- (c) torch and MLX agree ------------------------------------------------------------------------------

def test_torch_and_mlx_losses_agree(runs):
    if len(runs) < 2:
        pytest.skip("needs both backends")
    a, b = np.array(losses(runs["torch"]["full"])), np.array(losses(runs["mlx"]["full"]))
    assert len(a) == len(b) == TC.steps
    rel = np.abs(a - b) / np.abs(a)
    assert rel.max() <= 1e-4, f"max relative loss difference {rel.max():.2e}"


# --- (d) checkpoints of a frozen base ----------------------------------------------------------------------

@pytest.mark.parametrize("name", BACKENDS)
def test_checkpoint_holds_only_the_trained_tensors_and_resumes_exactly(name, retro, runs):
    folder, inserted = retro
    lib, _ = backend(name)
    ckpt_dir = runs[name]["full"] / tr.CHECKPOINT_DIR
    assert set(ckpt.read_header(ckpt_dir / ckpt.WEIGHTS_FILE)) == trained_names(folder, inserted)
    doc = json.loads((ckpt_dir / ckpt.CONFIG_FILE).read_text())
    assert doc["base"] == {"path": str(folder.resolve()), "sha256": tr.weights_sha256(folder), "freeze": "base"}
    assert doc["retrofit"]["inserted"] == inserted
    assert (ckpt_dir / "tokenizer.json").is_file() and (runs[name]["full"] / tr.MODEL_DIR / "tokenizer.json").is_file()
    assert (ckpt_dir / ckpt.WEIGHTS_FILE).stat().st_size < (folder / ckpt.WEIGHTS_FILE).stat().st_size / 2
    # 2 + 2 steps == 4 steps: losses and every weight
    assert losses(runs[name]["split"]) == losses(runs[name]["full"])
    full, split = (arrays(name, lib.load(runs[name][k] / tr.MODEL_DIR)) for k in ("full", "split"))
    assert all(np.array_equal(full[n], split[n]) for n in full)


@pytest.mark.parametrize("src,dst", [("torch", "mlx"), ("mlx", "torch")])
def test_converted_frozen_checkpoint_resumes_on_the_other_backend(src, dst, retro, runs, tmp_path):
    from convert.convert import convert_training_checkpoint

    if src not in runs or dst not in runs:
        pytest.skip("needs both backends")
    folder, _ = retro
    _, train = backend(dst)
    out = tmp_path / "run"
    convert_training_checkpoint(runs[src]["step2"], out / tr.CHECKPOINT_DIR, to=dst)
    summary = train.train(task_for(folder), None, TC, out, init=folder, progress=False, resume=True)
    assert summary["step"] == TC.steps
    ours, want = np.array(losses(out)), np.array(losses(runs[src]["full"])[2:])
    assert np.abs(ours - want).max() / np.abs(want).max() <= 1e-4
    # and into a clean model folder: the frozen tensors come back from the base folder
    lib, _ = backend(dst)
    convert_training_checkpoint(out / tr.CHECKPOINT_DIR, tmp_path / "clean", to=dst, dtype="float32")
    clean, model = arrays(dst, lib.load(tmp_path / "clean")), arrays(dst, lib.load(out / tr.MODEL_DIR))
    assert all(np.array_equal(clean[n], model[n]) for n in model)


# --- refusals ---------------------------------------------------------------------------------------------

def test_refusals(retro, runs, tmp_path):
    from click.testing import CliRunner

    from lmsleep.cli import cli

    folder, _ = retro
    plain = tmp_path / "plain"  # the same model without its retrofit record: not a retrofit
    shutil.copytree(folder, plain)
    doc = json.loads((plain / "config.json").read_text())
    del doc["retrofit"]
    (plain / "config.json").write_text(json.dumps(doc))
    args = ["train", "--task", "recall", "--task-arg", "k=[1,1]", "--task-arg", "facts=[1,1]", "--steps", "1",
            "--backend", "torch", "--quiet"]
    result = CliRunner().invoke(cli, [*args, "--init", str(plain), "--freeze", "base", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "not a retrofit" in result.output and len(result.output.strip().splitlines()) == 1
    # a different base under a checkpoint: refused
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    with open(other / ckpt.WEIGHTS_FILE, "r+b") as f:  # the lowest bit of the last float: another base
        f.seek(-4, 2)
        last = f.read(4)
        f.seek(-4, 2)
        f.write(bytes([last[0] ^ 1]) + last[1:])
    run = tmp_path / "run"
    shutil.copytree(runs["torch"]["step2"], run / tr.CHECKPOINT_DIR)
    result = CliRunner().invoke(cli, [*args, "--init", str(other), "--out", str(run), "--resume", "--steps", "4",
                                      "--task-arg", f"tokenizer_dir={folder}", "--set", "batch_size=4",
                                      "--set", "grad_accum=2"])
    assert result.exit_code == 2 and "another base" in result.output, result.output
    # and the retrofit preset needs a folder
    result = CliRunner().invoke(cli, ["train", "--task", "rule110", "--preset", "retrofit", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--init" in result.output


def test_freeze_modes_and_build_run_defaults(retro):
    """trainable_names per mode; build_run with --init: the retrofit preset, the folder's tokenizer and window."""
    folder, inserted = retro
    config, _ = ckpt.read_config(folder)
    names = list(ckpt.param_shapes(config))
    assert tr.trainable_names(config, "none") is None
    mlp = tr.trainable_names(config, "mlp")
    assert set(names) - set(mlp) == {n for n in names if ".mlp." in n} and "layers.0.norm2.weight" in mlp
    assert set(tr.trainable_names(config, "base", inserted)) == {n for n in names if n.startswith(("layers.1.", "layers.3."))}
    task, mc, tc = tr.build_run("recall", {"k": [1, 1], "facts": [1, 1]}, None, {"batch_size": 4}, init=folder)
    assert (tc.freeze, tc.checkpoint_windows, tc.muon_lr, tc.adamw_lr, tc.batch_size) == ("base", True, 1e-3, 5e-5, 4)
    assert task.params["tokenizer_dir"] == str(folder) and task.window == mc.window == WINDOW
    assert mc.to_dict() == config.to_dict()
    _, mc2, _ = tr.build_run("recall", {"k": [1, 1], "facts": [1, 1]}, None, {"window": 96, "sleep_passes": 3},
                             init=folder)
    assert (mc2.window, mc2.sleep_passes) == (96, 3)
    with pytest.raises(ValueError, match="changes the weights"):
        tr.check_init_config(tr.fine_tune(folder, tc), config.replace(d_model=32, head_dim=8, ssm_head_dim=8))
    with pytest.raises(ValueError, match="freezes the weights of a model folder"):
        tr.fine_tune(None, tc)
