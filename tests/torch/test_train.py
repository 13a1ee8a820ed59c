"""sleep_torch.train: schedule, loss alignment, optimizer split, checkpoints, exact resume, NaN stop.

DDP (2 gloo ranks == one process) is checked through the CLI: tests/test_cli.py::test_train_nproc_runs_ddp_with_gloo.

Runs use the debug preset on a tiny Rule 110 (width 8, 2 states: T = 19, windows of 8), a few
steps each, so the default set stays well under a minute and a half on 2 CPU cores.
"""

import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import sleep_torch
import sleep_torch.train as train_mod
from common import training as tr
from common.config import TRAIN_PRESETS, ModelConfig, TrainConfig
from common.tasks import make, rule110_majority_baseline
from sleep_torch.model import HybridLM
from sleep_torch.train import TrainingError, build_optimizers, lr_at, masked_loss, train

TASK = dict(width=8, states=2, steps=0)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices on 2 shared cores: one thread is faster than two
    yield
    torch.set_num_threads(before)


def small_run(**overrides) -> TrainConfig:
    base = TRAIN_PRESETS["debug"].replace(steps=6, warmup_steps=2, batch_size=8, eval_interval=0,
                                          eval_samples=16, save_interval=0, log_interval=1)
    return base.replace(**overrides)


def task_and_config():
    task = make("rule110", **TASK)
    return task, tr.resolve_model_config(task, "debug", {})


def weights(folder) -> dict:
    return {n: p.detach().clone() for n, p in sleep_torch.load(folder).named_parameters()}


def losses(out) -> list[float]:
    return [r["loss"] for r in tr.read_metrics(Path(out) / tr.METRICS_FILE)]


def folder_hash(folder) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(folder).iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


# --- pure pieces ----------------------------------------------------------------------------------

def test_lr_schedule():
    tc = TrainConfig(warmup_steps=4, steps=14, min_lr_ratio=0.1, schedule="cosine")
    assert [lr_at(s, tc) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, tc) == 1.0
    assert lr_at(9, tc) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert lr_at(14, tc) == pytest.approx(0.1) and lr_at(100, tc) == pytest.approx(0.1)
    lin = tc.replace(schedule="linear")
    assert lr_at(9, lin) == pytest.approx(0.55) and lr_at(14, lin) == pytest.approx(0.1)
    assert lr_at(13, tc.replace(schedule="constant")) == 1.0
    assert lr_at(0, tc.replace(warmup_steps=0)) == 1.0


def test_masked_loss_alignment():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    tokens = torch.tensor([[1, 2, 3, 4], [0, 1, 2, 3]])
    mask = torch.tensor([[False, False, True, True], [False, True, False, False]])
    s, n = masked_loss(logits, tokens, mask)
    # counted targets: tokens[0,2] (from logits[0,1]), tokens[0,3] (logits[0,2]), tokens[1,1] (logits[1,0])
    lp = torch.log_softmax(logits.double(), -1)
    expected = -(lp[0, 1, 3] + lp[0, 2, 4] + lp[1, 0, 1])
    assert n == 3
    assert float(s) == pytest.approx(float(expected), rel=1e-6)


def test_data_seeds_and_slices():
    assert tr.data_seed(0, 0) != tr.data_seed(0, 1) != tr.data_seed(1, 0)
    assert all(tr.data_seed(s, k) % 2 == 0 for s in range(3) for k in range(5))  # EVAL_SEED is odd
    assert tr.rank_rows(8, 1, 2) == (4, 8) and tr.micro_rows(4, 2) == [(0, 2), (2, 4)]
    with pytest.raises(ValueError, match="grad_accum"):
        tr.micro_rows(4, 3)


def test_optimizer_split():
    task, mc = task_and_config()
    model = HybridLM(mc.replace(tie_embeddings=False))
    opts = build_optimizers(model, small_run())
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opts["muon"].param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in opts["adamw"].param_groups for p in g["params"]}
    assert muon | adamw == set(names.values()) and not muon & adamw
    assert "layers.0.attn.q_proj.weight" in muon and "layers.1.ssm.g_proj.weight" in muon
    assert "layers.1.mlp.down_proj.weight" in muon
    for name in ("embed.weight", "lm_head.weight", "norm.weight", "layers.1.ssm.a_proj.weight",
                 "layers.1.ssm.b_proj.weight", "layers.1.ssm.q_conv.weight", "layers.1.ssm.A_log",
                 "layers.1.ssm.dt_bias", "layers.1.ssm.o_norm.weight", "layers.0.norm1.weight"):
        assert name in adamw, name


def test_muon_matches_reference_math():
    """One Muon step by hand: momentum, nesterov, float32 Newton-Schulz, sqrt(max(1, rows/cols)) lr."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 3))
    g = torch.randn(6, 3)
    p0 = p.detach().clone()
    opt = train_mod.Muon([p], lr=0.1, momentum=0.9, weight_decay=0.5)
    p.grad = g.clone()
    opt.step()
    v = 0.1 * g
    u = 0.1 * g + 0.9 * v
    X = (u / (u.norm() + 1e-7)).T.double()  # wide orientation (3, 6)
    for _ in range(5):
        A = X @ X.T
        X = 3.4445 * X + (-4.7750 * A + 2.0315 * A @ A) @ X
    expected = p0 * (1 - 0.1 * 0.5) - 0.1 * math.sqrt(2.0) * X.T.float()
    torch.testing.assert_close(p.detach(), expected, atol=1e-5, rtol=1e-5)


def test_model_config_comes_from_the_task(tmp_path):
    task = make("rule110", **TASK)
    mc = tr.resolve_model_config(task, "debug", {"d_model": 16})
    assert (mc.vocab_size, mc.window, mc.d_model) == (3, 8, 16)
    assert tr.resolve_model_config(task, "debug", {"window": 8}).window == 8  # agreeing is fine
    with pytest.raises(ValueError, match="window"):
        tr.resolve_model_config(task, "debug", {"window": 12})
    with pytest.raises(ValueError, match="vocab_size"):
        tr.resolve_model_config(task, "debug", {"vocab_size": 16})
    with pytest.raises(ValueError, match="vocab_size"):
        train(task, ModelConfig.from_name("debug"), small_run(), tmp_path / "x", progress=False)


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
    assert state["backend"] == "torch" and state["step"] == 8
    assert state["task"] == {"name": "rule110", "params": task.params}
    assert len(state["rng"]["torch_cpu"]) > 0
    opt = load_file(str(out / "checkpoint" / tr.OPTIMIZER_FILE))
    assert "muon.layers.0.attn.q_proj.weight.momentum" in opt and "adamw.embed.weight.exp_avg_sq" in opt
    assert json.loads((out / "checkpoint" / tr.OPTIMIZER_JSON).read_text())["adamw"]["step"] == 8
    model = sleep_torch.load(out / "model")  # plain model folder with the task's tokenizer
    assert model.tokenizer.decode([0, 1, 2]) == task.tokenizer.decode([0, 1, 2])
    for n, p in sleep_torch.load(out / "checkpoint").named_parameters():
        assert torch.equal(p, dict(model.named_parameters())[n])
    with pytest.raises(ValueError, match="already exists"):
        train(task, mc, tc, out, progress=False)


def test_grad_accum_gives_the_same_update(tmp_path):
    task, mc = task_and_config()
    train(task, mc, small_run(steps=2), tmp_path / "k1", progress=False)
    train(task, mc, small_run(steps=2, grad_accum=2), tmp_path / "k2", progress=False)
    a, b = weights(tmp_path / "k1" / "model"), weights(tmp_path / "k2" / "model")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=2e-5, rtol=1e-4, msg=name)
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
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_resume_refuses_mlx_checkpoints_and_other_models(tmp_path):
    task, mc = task_and_config()
    out = tmp_path / "run"
    train(task, mc, small_run(steps=1), out, progress=False)
    with pytest.raises(ValueError, match="d_model"):
        train(task, mc.replace(d_model=16), small_run(steps=2), out, progress=False, resume=True)
    path = out / "checkpoint" / tr.TRAINER_STATE_FILE
    path.write_text(path.read_text().replace('"backend": "torch"', '"backend": "mlx"'))
    with pytest.raises(ValueError, match="'mlx' training checkpoint"):
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
    model = sleep_torch.load(out / "checkpoint")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [r["step"] for r in tr.read_metrics(out / tr.METRICS_FILE)] == [1, 2, 3]


def test_module_entry_point(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = train_mod.main(["--task", "rule110", "--task-arg", "width=8", "--task-arg", "states=2", "--preset", "debug",
                         "--out", str(out), "--steps", "2", "--set", "batch_size=4", "--set", "d_model=16",
                         "--no-progress"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2
    assert sleep_torch.load(out / "model").config.d_model == 16
    rc = train_mod.main(["--task", "rule110", "--preset", "debug", "--out", str(tmp_path / "bad"),
                         "--set", "window=5", "--no-progress"])
    assert rc == 2 and "window" in capsys.readouterr().err  # a user error: one line, exit 2 (as the CLI)


@pytest.mark.slow
def test_rule110_retrieval_learns(tmp_path):
    """200 steps of the debug preset on the paper's Rule 110 layout (4 states of 24 bits) at t = 0
    (pure retrieval through the SSM state): far above chance (the majority-bit baseline, ~7% here)."""
    task = make("rule110", width=24, states=4, steps=0)
    mc = tr.resolve_model_config(task, "debug", {})
    tc = TRAIN_PRESETS["debug"].replace(steps=200, warmup_steps=20, batch_size=32, eval_interval=100,
                                        eval_samples=512, log_interval=20)
    summary = train(task, mc, tc, tmp_path / "r110", progress=False)
    ev = summary["eval"]
    chance = max(ev["majority_exact"], ev["chance_exact"])
    print(f"rule110 t=0: exact {ev['exact']:.3f} (majority baseline {ev['majority_exact']:.3f}, "
          f"1/2^states {ev['chance_exact']:.3f}), {summary['wall_time']:.0f} s")
    assert ev["majority_exact"] == rule110_majority_baseline(task.sample(512, tr.EVAL_SEED).meta["answers"])
    assert ev["exact"] > max(0.5, chance + 0.3)


def test_resume_at_the_end_rewrites_model_folder(tmp_path):
    """A kill after the last checkpoint but before model/ was rewritten: resuming at the end writes model/ again."""
    task = make("rule110", **TASK)
    tc = small_run(steps=2)
    train(task, "debug", tc, tmp_path, progress=False)
    stale = tmp_path / tr.MODEL_DIR
    import shutil

    shutil.rmtree(stale)  # (or an older save's weights): what the kill left
    summary = train(task, "debug", tc, tmp_path, progress=False, resume=True)
    assert summary["step"] == 2
    a = load_file(str(tmp_path / tr.CHECKPOINT_DIR / "model.safetensors"))
    b = load_file(str(stale / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
