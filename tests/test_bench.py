"""`lmsleep bench`: every benchmark runs at tiny sizes and writes well-formed JSON (no timing asserts)."""

import json

import pytest
from click.testing import CliRunner

from lmsleep.bench import decode, scan, serve, sleep, train
from lmsleep.bench.train import step_flops, token_passes
from lmsleep.cli import cli
from common.config import ModelConfig

pytest.importorskip("torch")
BACKENDS = ["torch", pytest.param("mlx", marks=pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("mlx") is None, reason="mlx is not installed"))]
DOC_KEYS = {"bench", "backend", "quick", "machine", "settings", "rows", "targets"}
MACHINE_KEYS = {"date", "platform", "cpu", "cpu_count", "torch", "mlx", "backend", "device", "dtype", "load_avg"}


def check_doc(doc, bench, backend, row_keys):
    assert DOC_KEYS <= set(doc), set(doc)
    assert doc["bench"] == bench and doc["backend"] == backend
    assert MACHINE_KEYS <= set(doc["machine"])
    assert doc["rows"], "no rows"
    for row in doc["rows"]:
        assert row_keys <= set(row), set(row)
    for t in doc["targets"]:
        assert {"name", "target", "measured", "met"} <= set(t)
    json.dumps(doc)  # JSON-ready


@pytest.mark.parametrize("backend", BACKENDS)
def test_scan(backend):
    doc = scan.run(backend, quick=True, lengths=(8, 16), repeats=1)
    check_doc(doc, "scan", backend, {"rule", "mode", "T", "impl", "median_s", "p90_s", "tokens_per_s",
                                     "speedup_vs_ref"})
    assert {(r["impl"], r["mode"]) for r in doc["rows"]} == {(i, m) for i in ("ref", "chunk") for m in scan.MODES}
    assert "kernel" in doc["skipped"]  # no CUDA / Metal on the test machines
    assert len(doc["targets"]) == 2 and all("T=16" in t["name"] for t in doc["targets"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode(backend):
    doc = decode.run(backend, quick=True, contexts=(32, 64), measure=16, window=8)
    check_doc(doc, "decode", backend, {"model", "context", "p50_ms", "p90_ms", "sleep_step_ms", "state_bytes_peak",
                                       "kv_bytes_peak", "rss_bytes", "replay_p50_ms", "replay_p90_ms"})
    assert all(r["replay_steps"] == 4 * 8 for r in doc["rows"])  # quick: 4 rounds of one window (L = 8)
    assert all(r["replay_sleep_step_ms"] is None for r in doc["rows"] if r["model"] == "baseline")  # never evicts
    assert [(r["model"], r["context"]) for r in doc["rows"]] == [
        ("sleep", 32), ("sleep", 64), ("baseline", 32), ("baseline", 64)]
    sleep_rows = [r for r in doc["rows"] if r["model"] == "sleep"]
    assert all(r["sleep_steps"] == 2 for r in sleep_rows)  # 16 measured steps, a window of 8
    assert sleep_rows[0]["state_bytes_peak"] == sleep_rows[1]["state_bytes_peak"]  # bounded State
    base = [r for r in doc["rows"] if r["model"] == "baseline"]
    assert base[1]["kv_bytes_peak"] == 2 * base[0]["kv_bytes_peak"]  # the baseline's cache grows
    assert {t["name"].split(",")[0] for t in doc["targets"]} == {
        "sleep model wake-step latency p50 (interleaved replay)", "sleep model peak State memory change"}


def test_decode_token_stream():
    doc = decode.run("torch", contexts=(24, 48), measure=8, window=8, stream_mode="tokens", baseline=False, rounds=1)
    assert doc["streams"][0]["steps_timed"] == 48 and doc["rows"][-1]["seen"] == 48


@pytest.mark.parametrize("backend", BACKENDS)
def test_sleep(backend):
    doc = sleep.run(backend, quick=True, passes=(1, 2, 3), windows=(8, 16))
    check_doc(doc, "sleep", backend, {"sweep", "window", "passes", "prefill_ms", "sleep_ms", "sleep_vs_prefill"})
    assert [(r["sweep"], r["window"], r["passes"]) for r in doc["rows"]] == [
        ("passes", 8, 1), ("passes", 8, 2), ("passes", 8, 3), ("window", 8, 4), ("window", 16, 4)]
    assert doc["fit"]["r2"] is not None and len(doc["targets"]) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_train(backend):
    doc = train.run(backend, presets=["debug"], passes=(1, 2), batch=4, micro_batch=2, repeats=1, peak_n=128)
    check_doc(doc, "train", backend, {"preset", "passes", "batch", "median_s", "tokens_per_s", "flops_per_step",
                                      "achieved_gflops", "fraction_of_peak", "fwd_bwd_s", "optimizer_s"})
    assert backend in doc["peaks"]
    if backend == "torch":
        assert len(doc["profile"]["top"]) == 10 and len(doc["targets"]) == 2
    else:
        assert doc["profile"] is None and doc["targets"] == []


def test_flop_count():
    assert token_passes(101, 24, 4) == 4 * 24 * 4 + 5  # four full windows sleep, the partial one does not
    assert token_passes(48, 24, 3) == 24 * 3 + 24  # the last full window's sleep never runs
    mc = ModelConfig.from_name("paper-rule110", sleep_passes=1)
    f = step_flops(mc, 101, 2)
    assert f["params_blocks"] == 4_329_472  # 2 x (attention 262144 + MLP 786432) + 2 x (SSM 329728 + MLP)
    assert f["total"] == f["blocks"] + f["head"] + f["attention"]
    assert f["blocks"] == 6 * 4_329_472 * 202


@pytest.mark.parametrize("command,extra,keys", [
    ("scan", ["--length", "8", "--repeats", "1"], {"rule", "impl", "median_s"}),
    ("decode", ["--context", "32", "--context", "64", "--measure", "16", "--window", "8"], {"model", "p50_ms"}),
    ("sleep", ["--passes", "1", "--passes", "2", "--window", "8"], {"passes", "sleep_ms"}),
    ("train", ["--preset", "debug", "--passes", "1", "--batch", "2", "--repeats", "1", "--no-profile"],
     {"preset", "tokens_per_s"}),
    ("serve", ["--concurrency", "2", "--turns", "2", "--max-tokens", "2"], {"concurrency", "ttft_p50_ms"}),
])
def test_cli(tmp_path, command, extra, keys):
    out = tmp_path / f"{command}.json"
    png = tmp_path / f"{command}.png"
    result = CliRunner().invoke(cli, ["bench", command, "--backend", "torch", "--quick", "--json", str(out),
                                      "--plot", str(png), *extra])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["command"].startswith(f"lmsleep bench {command}") and "--quick" in doc["command"]
    assert keys <= set(doc["rows"][0])
    assert f"json: {out}" in result.output
    try:
        import matplotlib  # noqa: F401
        assert png.is_file()
    except ImportError:
        assert "plot skipped" in result.output


def test_serve():
    doc = serve.run("torch", quick=True, threads=1)
    check_doc(doc, "serve", "torch", {"concurrency", "turns", "requests", "wall_s", "tokens_per_s", "ttft_p50_ms",
                                      "ttft_p90_ms", "ttft_turn1_ms", "ttft_last_ms", "cached_tokens"})
    assert [r["concurrency"] for r in doc["rows"]] == [1, 4]
    assert all(r["requests"] == r["concurrency"] * serve.QUICK["turns"] for r in doc["rows"])
    assert len(doc["requests"]) == sum(r["requests"] for r in doc["rows"])
    assert all(r["completion_tokens"] <= serve.QUICK["max_tokens"] for r in doc["requests"])
    later = [r for r in doc["requests"] if r["turn"] > 1]
    assert later and all(r["cached_tokens"] > 0 for r in later)  # later turns continue a kept State
    assert set(doc["flat_cost"]) == {"concurrency", "ttft_turn1_ms", "ttft_turn2_ms", "ttft_last_ms", "ratio"}
    assert len(doc["targets"]) == 1


def test_cpu_thread_policy(monkeypatch):
    from common import backends

    for usable, env, chosen in [(2, {}, {"OMP_NUM_THREADS": "1"}), (1, {}, {"OMP_NUM_THREADS": "1"}), (8, {}, {}),
                                (2, {"OMP_NUM_THREADS": "2"}, {})]:  # the user's setting wins
        monkeypatch.setattr(backends, "cpus_usable", lambda: usable)
        environ = dict(env)
        assert backends.cpu_thread_policy(environ) == chosen
        assert environ == {**env, **chosen}


def test_cli_help_and_user_errors():
    for command in ("scan", "decode", "sleep", "train", "serve"):
        result = CliRunner().invoke(cli, ["bench", command, "--help"])
        assert result.exit_code == 0 and "Example" in result.output
    result = CliRunner().invoke(cli, ["bench", "scan", "--backend", "torch", "--device", "tpu"])
    assert result.exit_code == 2 and "--device 'tpu'" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["bench", "decode", "--backend", "torch", "--context", "100", "--context", "110"])
    assert result.exit_code == 2 and "at least 256 tokens" in result.output
