"""sleep_mlx.train: loss alignment, optimizer split and math, bf16 compute, checkpoints, exact resume,
NaN stop. Mirrors tests/torch/test_train.py (the schedule and data seeds are common/ code, tested
there); tests/test_parity_train.py checks that both trainers give the same numbers.

Runs use the debug preset on a tiny Rule 110 (width 8, 2 states: T = 19, windows of 8), a few
steps each (~0.1 s per step on CPU).
"""

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from mlx.utils import tree_flatten, tree_map  # noqa: E402

import sleep_mlx  # noqa: E402
import sleep_mlx.train as train_mod  # noqa: E402
from common import training as tr  # noqa: E402
from common.config import TRAIN_PRESETS, ModelConfig  # noqa: E402
from common.tasks import make  # noqa: E402
from sleep_mlx.model import HybridLM  # noqa: E402
from sleep_mlx.train import TrainingError, build_optimizers, masked_loss, train  # noqa: E402
from tests.conftest import assert_close  # noqa: E402

TASK = dict(width=8, states=2, steps=0)


def small_run(**overrides):
    base = TRAIN_PRESETS["debug"].replace(steps=6, warmup_steps=2, batch_size=8, eval_interval=0,
                                          eval_samples=16, save_interval=0, log_interval=1)
    return base.replace(**overrides)


def task_and_config():
    task = make("rule110", **TASK)
    return task, tr.resolve_model_config(task, "debug", {})


def weights(folder) -> dict:
    return dict(tree_flatten(sleep_mlx.load(folder).parameters()))


def losses(out) -> list[float]:
    return [r["loss"] for r in tr.read_metrics(Path(out) / tr.METRICS_FILE)]


def folder_hash(folder) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(folder).iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


# --- pure pieces ----------------------------------------------------------------------------------

def test_masked_loss_alignment():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 4, 5)).astype(np.float32)
    tokens = np.array([[1, 2, 3, 4], [0, 1, 2, 3]])
    mask = np.array([[False, False, True, True], [False, True, False, False]])
    logits_mx = mx.array(logits)
    logits_mx[0, 3] = mx.array([float("inf")] * 5)  # an uncounted position cannot poison the sum
    s, n = masked_loss(logits_mx, mx.array(tokens, dtype=mx.int32), mx.array(mask))
    # counted targets: tokens[0,2] (from logits[0,1]), tokens[0,3] (logits[0,2]), tokens[1,1] (logits[1,0])
    x = logits.astype(np.float64)
    lp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    expected = -(lp[0, 1, 3] + lp[0, 2, 4] + lp[1, 0, 1])
    assert n == 3
    assert s.item() == pytest.approx(expected, rel=1e-6)


def test_optimizer_split():
    task, mc = task_and_config()
    model = HybridLM(mc.replace(tie_embeddings=False))
    muon = set(train_mod._param_names(model, "muon"))
    adamw = set(train_mod._param_names(model, "adamw"))
    names = {n for n, _ in tree_flatten(model.parameters())}
    assert muon | adamw == names and not muon & adamw
    assert {"layers.0.attn.q_proj.weight", "layers.1.ssm.g_proj.weight", "layers.1.mlp.down_proj.weight"} <= muon
    for name in ("embed.weight", "lm_head.weight", "norm.weight", "layers.1.ssm.a_proj.weight",
                 "layers.1.ssm.b_proj.weight", "layers.1.ssm.q_conv.weight", "layers.1.ssm.A_log",
                 "layers.1.ssm.dt_bias", "layers.1.ssm.o_norm.weight", "layers.0.norm1.weight"):
        assert name in adamw, name
    # after one update each optimizer holds state for exactly its own parameters
    opts = build_optimizers(model, small_run())
    train_mod.optimizer_step(model, opts, tree_map(mx.ones_like, model.parameters()))
    tensors, doc = train_mod.optimizer_state(model, opts)
    assert {tr.split_optimizer_tensor_name(n)[1] for n in tensors if n.startswith("muon.")} == muon
    assert {tr.split_optimizer_tensor_name(n)[1] for n in tensors if n.startswith("adamw.")} == adamw
    assert "muon.layers.0.attn.q_proj.weight.momentum" in tensors and "adamw.embed.weight.exp_avg" in tensors
    assert doc["muon"]["step"] == doc["adamw"]["step"] == 1


def test_muon_matches_reference_math():
    """One Muon step by hand: momentum, nesterov, float32 Newton-Schulz, sqrt(max(1, rows/cols)) lr,
    decoupled weight decay (the weight shrinks before the update; the decay is not orthogonalized)."""
    rng = np.random.default_rng(0)
    p0, g = rng.standard_normal((6, 3)), rng.standard_normal((6, 3))
    opt = train_mod.Muon(0.1, momentum=0.9, weight_decay=0.5)
    new = opt.apply_gradients({"w": mx.array(g, dtype=mx.float32)}, {"w": mx.array(p0, dtype=mx.float32)})["w"]
    v = 0.1 * g
    u = 0.1 * g + 0.9 * v
    X = (u / (np.linalg.norm(u) + 1e-7)).T  # wide orientation (3, 6)
    for _ in range(5):
        A = X @ X.T
        X = 3.4445 * X + (-4.7750 * A + 2.0315 * A @ A) @ X
    expected = p0 * (1 - 0.1 * 0.5) - 0.1 * math.sqrt(2.0) * X.T
    assert_close("muon step", expected, new, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="2-D"):
        train_mod.Muon(0.1).apply_gradients({"b": mx.ones((3,))}, {"b": mx.ones((3,))})


def test_bfloat16_computes_on_bf16_copies_of_float32_weights(tmp_path):
    task, mc = task_and_config()
    model = HybridLM(mc)
    tokens = mx.array(task.sample(2, 0).tokens, dtype=mx.int32)
    with train_mod.compute_dtype(model, mx.bfloat16):
        assert model(tokens).dtype == mx.bfloat16
        params = dict(tree_flatten(model.parameters()))
        assert params["layers.1.ssm.A_log"].dtype == params["layers.1.ssm.dt_bias"].dtype == mx.float32
        assert params["layers.1.ssm.q_proj.weight"].dtype == mx.bfloat16
    assert {p.dtype for _, p in tree_flatten(model.parameters())} == {mx.float32}  # restored
    a = train(task, mc, small_run(steps=3), tmp_path / "f32", progress=False)
    b = train(task, mc, small_run(steps=3, dtype="bfloat16"), tmp_path / "bf16", progress=False)
    assert math.isfinite(b["loss"]) and abs(b["loss"] - a["loss"]) < 0.02 * a["loss"]
    assert {p.dtype for p in weights(tmp_path / "bf16" / "model").values()} == {mx.float32}  # masters
    with pytest.raises(ValueError, match="float16"):
        train(task, mc, small_run(dtype="float16"), tmp_path / "f16", progress=False)


def test_rng_state_roundtrip():
    mx.random.seed(7)
    saved = train_mod.rng_state()
    a = mx.random.normal((4,))
    json.dumps(saved)  # plain JSON
    train_mod.set_rng_state(saved)
    assert np.array_equal(np.array(a), np.array(mx.random.normal((4,))))


# --- runs -------------------------------------------------------------------------------------------

def test_run_writes_metrics_checkpoint_and_model(tmp_path):
    task, mc = task_and_config()
    tc = small_run(steps=8, eval_interval=4, save_interval=4)
    out = tmp_path / "run"
    summary = train(task, mc, tc, out, progress=False)
    assert summary["step"] == 8 and math.isfinite(summary["loss"])
    assert {"exact", "per_answer", "loss"} <= set(summary["eval"])
    records = tr.read_metrics(out / tr.METRICS_FILE)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert {"loss", "lr", "lr_adamw", "grad_norm", "tokens_per_s", "elapsed"} <= set(records[0])
    assert "eval_exact" in records[3] and "eval_loss" in records[7]
    assert records[-1]["loss"] < records[0]["loss"]  # it learns something in 8 steps
    state = json.loads((out / "checkpoint" / tr.TRAINER_STATE_FILE).read_text())
    assert state["backend"] == "mlx" and state["step"] == 8
    assert state["task"] == {"name": "rule110", "params": task.params}
    assert len(state["rng"]["mlx"]) == 2
    opt = mx.load(str(out / "checkpoint" / tr.OPTIMIZER_FILE))
    assert "muon.layers.0.attn.q_proj.weight.momentum" in opt and "adamw.embed.weight.exp_avg_sq" in opt
    assert json.loads((out / "checkpoint" / tr.OPTIMIZER_JSON).read_text())["adamw"]["step"] == 8
    model = sleep_mlx.load(out / "model")  # plain model folder with the task's tokenizer
    assert model.tokenizer.decode([0, 1, 2]) == task.tokenizer.decode([0, 1, 2])
    final = dict(tree_flatten(model.parameters()))
    for n, p in weights(out / "checkpoint").items():
        assert mx.array_equal(p, final[n]).item(), n
    torch = pytest.importorskip("torch")
    import sleep_torch
    for folder in ("model", "checkpoint"):  # the torch backend reads both folders, bit for bit
        for n, p in sleep_torch.load(out / folder).named_parameters():
            assert torch.equal(p.detach(), torch.from_numpy(np.array(final[n]))), (folder, n)
    with pytest.raises(ValueError, match="already exists"):
        train(task, mc, tc, out, progress=False)


def test_grad_accum_gives_the_same_update(tmp_path):
    task, mc = task_and_config()
    train(task, mc, small_run(steps=2), tmp_path / "k1", progress=False)
    train(task, mc, small_run(steps=2, grad_accum=2), tmp_path / "k2", progress=False)
    a, b = weights(tmp_path / "k1" / "model"), weights(tmp_path / "k2" / "model")
    for name in a:
        assert_close(name, a[name], b[name], atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(losses(tmp_path / "k2"), losses(tmp_path / "k1"), rtol=1e-5)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    task, mc = task_and_config()
    tc = small_run(steps=6)
    train(task, mc, tc, tmp_path / "straight", progress=False)
    train(task, mc, tc, tmp_path / "split", progress=False, max_steps=3)
    assert json.loads((tmp_path / "split/checkpoint" / tr.TRAINER_STATE_FILE).read_text())["step"] == 3
    summary = train(task, mc, tc, tmp_path / "split", progress=False, resume=True)
    assert summary["step"] == 6
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")  # same float32 numbers
    a, b = weights(tmp_path / "straight" / "model"), weights(tmp_path / "split" / "model")
    assert all(mx.array_equal(a[n], b[n]).item() for n in a)


def test_resume_refuses_torch_checkpoints_and_other_models(tmp_path):
    task, mc = task_and_config()
    out = tmp_path / "run"
    train(task, mc, small_run(steps=1), out, progress=False)
    with pytest.raises(ValueError, match="d_model"):
        train(task, mc.replace(d_model=16), small_run(steps=2), out, progress=False, resume=True)
    path = out / "checkpoint" / tr.TRAINER_STATE_FILE
    path.write_text(path.read_text().replace('"backend": "mlx"', '"backend": "torch"'))
    with pytest.raises(ValueError, match=r"^\S+ is a 'torch' training checkpoint and this is the 'mlx' trainer"):
        train(task, mc, small_run(steps=2), out, progress=False, resume=True)
    with pytest.raises(ValueError, match="missing"):
        train(task, mc, small_run(steps=2), tmp_path / "none", progress=False, resume=True)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    task, mc = task_and_config()
    out = tmp_path / "run"
    calls, snapshot = [0], {}
    real = train_mod.masked_loss

    def poisoned(logits, tokens, mask):
        calls[0] += 1
        s, n = real(logits, tokens, mask)
        if calls[0] == 4:  # the 4th step; the checkpoint of step 2 is on disk
            snapshot["checkpoint"] = folder_hash(out / "checkpoint")
            snapshot["model"] = folder_hash(out / "model")
            return s * float("nan"), n
        return s, n

    monkeypatch.setattr(train_mod, "masked_loss", poisoned)
    with pytest.raises(TrainingError, match=r"loss is nan at step 4; last good checkpoint: .*checkpoint$"):
        train(task, mc, small_run(steps=6, save_interval=2), out, progress=False)
    assert folder_hash(out / "checkpoint") == snapshot["checkpoint"]
    assert folder_hash(out / "model") == snapshot["model"]
    assert json.loads((out / "checkpoint" / tr.TRAINER_STATE_FILE).read_text())["step"] == 2
    model = sleep_mlx.load(out / "checkpoint")
    assert all(mx.isfinite(p).all().item() for _, p in tree_flatten(model.parameters()))
    assert [r["step"] for r in tr.read_metrics(out / tr.METRICS_FILE)] == [1, 2, 3]


def test_module_entry_point(tmp_path, capsys, monkeypatch):
    out = tmp_path / "cli"
    rc = train_mod.main(["--task", "rule110", "--task-arg", "width=8", "--task-arg", "states=2", "--preset", "debug",
                         "--out", str(out), "--steps", "2", "--set", "batch_size=4", "--set", "d_model=16",
                         "--device", "cpu", "--no-progress"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2
    assert sleep_mlx.load(out / "model").config.d_model == 16
    rc = train_mod.main(["--task", "rule110", "--preset", "debug", "--out", str(tmp_path / "bad"),
                         "--set", "window=5", "--no-progress"])
    assert rc == 2 and "window" in capsys.readouterr().err  # a user error: one line, exit 2 (as the CLI)
    task, mc = task_and_config()
    with pytest.raises(ValueError, match="vocab_size"):
        train(task, ModelConfig.from_name("debug"), small_run(), tmp_path / "x", progress=False)
    if not mx.is_available(mx.gpu):
        with pytest.raises(ValueError, match="device"):
            train(task, mc, small_run(), tmp_path / "x", progress=False, device="gpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="one device"):
        train(task, mc, small_run(), tmp_path / "x", progress=False)
