"""convert.parity: torch and MLX run the same folder to 1e-4 relative error (float32) at every stage.

Random `debug` and full-size `paper-rule110` models, N in {1, 3}, hard and sliding eviction, a looped
sub-range; then a briefly trained model whose greedy generations of 200 tokens (25 sleeps) must be
identical in both backends; then the report's failure modes (mismatched traces, a tolerance of 0).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")

import sleep_mlx  # noqa: E402
import sleep_torch  # noqa: E402
from common import training as tr  # noqa: E402
from common.config import TRAIN_PRESETS, ModelConfig  # noqa: E402
from common.tasks import make  # noqa: E402
from convert.parity import ParityReport, _compare, parity  # noqa: E402
from sleep_mlx.generate import generate as generate_mlx  # noqa: E402
from sleep_torch.generate import generate as generate_torch  # noqa: E402
from sleep_torch.train import train  # noqa: E402

TOL = 1e-4

# preset, overrides, passes, gen_tokens (generation is the slow part: a few cases run it)
CASES = {
    "debug-N1-hard": ("debug", dict(eviction="hard"), 1, 20),
    "debug-N3-hard": ("debug", dict(eviction="hard"), 3, 40),
    "debug-N3-sliding": ("debug", dict(eviction="sliding"), 3, 0),
    "debug-N3-sliding-loop1:3": ("debug", dict(eviction="sliding", n_layers=4, sleep_layers=[1, 3]), 3, 0),
    "paper-rule110-N1-sliding": ("paper-rule110", dict(eviction="sliding"), 1, 0),
    "paper-rule110-N3-hard-loop1:3": ("paper-rule110", dict(eviction="hard", sleep_layers=[1, 3]), 3, 20),
    "paper-rule110-N3-sliding": ("paper-rule110", dict(eviction="sliding"), 3, 0),
}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices on 2 shared cores
    yield
    torch.set_num_threads(before)


def folder(tmp_path, preset, seed=1, **overrides):
    cfg = ModelConfig.from_name(preset, **overrides)
    sleep_torch.save(sleep_torch.HybridLM(cfg, seed=seed), tmp_path / preset)
    return tmp_path / preset


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_parity_within_tolerance(tmp_path, case):
    preset, overrides, passes, gen = CASES[case]
    model_dir = folder(tmp_path, preset, **overrides)
    window = ModelConfig.from_name(preset).window
    report = parity(model_dir, passes=passes, tokens=3 * window + 5, gen_tokens=gen)  # 3 sleeps + a partial window
    print(f"{case}: max rel {report.max_rel:.2e}, generation {report.gen_agree}/{report.gen_compared}")
    assert report.ok, report.format_table()
    labels = [s.stage for s in report.stages]
    assert labels[-1] == "logits" and sum(s.endswith("embed") for s in labels) == 4
    n_sleep = sum(s.startswith("sleep") for s in labels)
    cfg = ModelConfig.from_name(preset, **overrides)
    a, b = cfg.loop_range
    looped_ssm = sum(k == "S" for k in cfg.layer_types[a:b])
    coda_ssm = sum(k == "S" for k in cfg.layer_types[b:])
    assert n_sleep == (3 * ((passes - 1) * looped_ssm + coda_ssm) if passes > 1 else 0)
    assert report.gen_steps == gen and report.gen_compared >= gen // 2


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory):
    """A debug model trained 30 steps on a small Rule 110 (window 8), so greedy margins are real."""
    torch.set_num_threads(1)  # (module fixtures run before the per-test thread fixture)
    task = make("rule110", width=8, states=2, steps=1)
    tc = TRAIN_PRESETS["debug"].replace(steps=30, warmup_steps=5, batch_size=16, eval_interval=0,
                                        eval_samples=16, save_interval=0, log_interval=10)
    out = tmp_path_factory.mktemp("run")
    train(task, tr.resolve_model_config(task, "debug", {}), tc, out, progress=False)
    return out / tr.MODEL_DIR


@pytest.mark.parametrize("passes", [2, 3])
def test_trained_model_generates_identically(trained_model, passes):
    t_model, m_model = sleep_torch.load(trained_model), sleep_mlx.load(trained_model)
    prompt = t_model.tokenizer.encode("01101001")  # one full window, then 200 tokens = 25 more sleeps
    with torch.no_grad():
        ref = list(generate_torch(t_model, prompt, max_tokens=200, passes=passes))
    out = list(generate_mlx(m_model, prompt, max_tokens=200, passes=passes))
    assert len(ref) == 200 and ref == out
    report = parity(trained_model, passes=passes, tokens=40, gen_tokens=200)
    print(f"trained N={passes}: max rel {report.max_rel:.2e}, {report.gen_compared}/200 steps above the margin")
    assert report.ok, report.format_table()
    assert report.gen_agree_all == 200 and report.gen_compared >= 190  # a trained model has clear margins


def test_report_flags_errors_and_mismatched_traces(tmp_path):
    model_dir = folder(tmp_path, "debug")
    strict = parity(model_dir, tokens=12, gen_tokens=3, tol=0.0)
    assert not strict.ok and strict.max_rel > 0 and "FAIL" in strict.format_table()
    stages, problems = _compare([("window 0 embed", np.zeros(2)), ("window 0 block 0", np.ones(2))],
                                [("window 0 embed", np.zeros(2)), ("window 0 block 1", np.ones(2))])
    assert len(stages) == 1 and problems and "block 0" in problems[0]
    report = ParityReport("m", 1, "hard", 4, 1, TOL, stages, 0, 0, 0, 0, problems)
    assert not report.ok and "problem:" in report.format_table()


def test_bad_arguments(tmp_path):
    model_dir = folder(tmp_path, "debug")
    with pytest.raises(ValueError, match="tokens and batch"):
        parity(model_dir, tokens=0)
    with pytest.raises(ValueError, match="not a model folder"):
        parity(tmp_path / "nowhere")
