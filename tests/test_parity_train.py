"""Cross-backend parity of training: sleep_torch.train and sleep_mlx.train from the same seed on the
same batches give the same losses and weights.

Debug preset on Rule 110 (width 8, 2 states, t = 1), batch 8, 20 steps (5 warmup, cosine, grad clip 1),
with and without decoupled weight decay. Measured on CPU (torch 2.13, mlx 0.32.4): max relative loss
difference over the 20 steps ~3e-7 for both (float32 rounding; it does not visibly grow in 20 steps).
Tolerance LOSS_RTOL = 2e-5 (~70x margin), far below what the decay itself changes, which the test
checks so that a coupled-vs-decoupled or bias-correction mismatch cannot pass.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")

from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

import sleep_mlx  # noqa: E402
import sleep_mlx.train as mlx_train  # noqa: E402
import sleep_torch  # noqa: E402
import sleep_torch.train as torch_train  # noqa: E402
from common import training as tr  # noqa: E402
from common.config import TRAIN_PRESETS  # noqa: E402
from common.tasks import make  # noqa: E402
from tests.conftest import assert_close  # noqa: E402

LOSS_RTOL = 2e-5  # measured max ~3e-7 over 20 steps
WEIGHT_RTOL = 1e-4  # final weights, relative to each tensor's max; measured ~1e-6
WEIGHT_DECAY = {"wd0": 0.0, "wd0.5": 0.5}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def run_both(tmp_path, tc):
    task = make("rule110", width=8, states=2, steps=1)
    mc = tr.resolve_model_config(task, "debug", {})
    torch_train.train(task, mc, tc, tmp_path / "torch", progress=False)
    mlx_train.train(task, mc, tc, tmp_path / "mlx", progress=False)
    losses = {b: np.array([r["loss"] for r in tr.read_metrics(tmp_path / b / tr.METRICS_FILE)])
              for b in ("torch", "mlx")}
    return losses["torch"], losses["mlx"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """weight_decay -> (folder, torch losses, mlx losses), each pair of runs trained once per module:
    the decay case compares against the no-decay runs instead of training them again."""
    done = {}

    def get(wd):
        if wd not in done:
            tc = TRAIN_PRESETS["debug"].replace(steps=20, warmup_steps=5, batch_size=8, eval_interval=0,
                                                save_interval=0, log_interval=1, weight_decay=wd)
            folder = tmp_path_factory.mktemp(f"wd{wd}")
            done[wd] = (folder, *run_both(folder, tc))
        return done[wd]

    return get


@pytest.mark.parametrize("wd", WEIGHT_DECAY.values(), ids=list(WEIGHT_DECAY))
def test_first_20_training_steps_match(runs, wd):
    folder, ref, out = runs(wd)
    assert len(ref) == len(out) == 20
    rel = np.abs(out - ref) / np.abs(ref)
    print(f"weight_decay={wd}: max relative loss difference over 20 steps {rel.max():.2e} "
          f"(steps 1-10 {rel[:10].max():.2e}, 11-20 {rel[10:].max():.2e})")
    assert rel.max() <= LOSS_RTOL, f"step {rel.argmax() + 1}: torch {ref[rel.argmax()]} vs mlx {out[rel.argmax()]}"
    t_weights = dict(sleep_torch.load(folder / "torch" / "model").named_parameters())
    for name, p in tree_flatten(sleep_mlx.load(folder / "mlx" / "model").parameters()):
        assert_close(f"final {name}", t_weights[name], p, rtol=WEIGHT_RTOL)
    if wd:  # the decay really acts: it moves the losses far more than the tolerance
        _, no_decay, _ = runs(0.0)
        assert np.abs(no_decay - ref).max() / np.abs(ref).max() > 20 * LOSS_RTOL


def test_one_optimizer_step_matches():
    """Muon + AdamW (decoupled decay, bias correction) on identical weights and gradients, 3 steps."""
    rng = np.random.default_rng(0)
    tc = TRAIN_PRESETS["debug"].replace(weight_decay=0.3)
    shapes = {"layers.0.attn.q_proj.weight": (8, 4), "layers.0.mlp.down_proj.weight": (4, 12),
              "embed.weight": (5, 4), "norm.weight": (4,)}
    init = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    grads = [{n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()} for _ in range(3)]

    class Params(torch.nn.Module):  # stand-ins with canonical names
        def __init__(self):
            super().__init__()
            self.p = torch.nn.ParameterDict({n.replace(".", "/"): torch.nn.Parameter(torch.tensor(v))
                                             for n, v in init.items()})

        def named_parameters(self, *a, **k):
            return [(n.replace("/", "."), p) for n, p in self.p.items()]

    class MLXParams:
        def __init__(self):
            self.tree = tree_unflatten([(n, mx.array(v)) for n, v in init.items()])

        def trainable_parameters(self):
            return self.tree

        def update(self, new):
            flat = dict(tree_flatten(self.tree)) | dict(tree_flatten(new))
            self.tree = tree_unflatten(list(flat.items()))

    t_model, m_model = Params(), MLXParams()
    t_opts, m_opts = torch_train.build_optimizers(t_model, tc), mlx_train.build_optimizers(m_model, tc)
    for step, g in enumerate(grads):
        torch_train.set_lr(t_opts, tc, step + 20)
        mlx_train.set_lr(m_opts, tc, step + 20)
        for name, p in t_model.named_parameters():
            p.grad = torch.tensor(g[name])
        for opt in t_opts.values():
            opt.step()
        mlx_train.optimizer_step(m_model, m_opts, tree_unflatten([(n, mx.array(v)) for n, v in g.items()]))
    out = dict(tree_flatten(m_model.tree))
    for name, p in t_model.named_parameters():
        assert_close(name, p, out[name], rtol=1e-6)
