"""experiments/retrofit (the CPU SmolLM2 experiment) and experiments/gpu (the paper-scale recipe): the commands,
resumability, the report's table, the memory estimate, and the GPU recipe's dry run (1 step on a tiny model)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")


def test_retrofit_runner_dry_run_lists_every_command(tmp_path, capsys):
    from experiments.gpu.recipe import check_options
    from experiments.retrofit import grid
    from experiments.retrofit.run import main, plan

    root = str(tmp_path / "r")
    assert main(["--root", root, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["retrofit", "train", "train", "sleep-eval"]
    assert "smollm2-135m-instruct" in lines[0] and "--window 32" in lines[0]
    for n, line in zip(grid.PASSES, lines[1:3]):
        assert f"--passes {n} " in line and "--freeze base" in line and "--resume" in line
        assert f"--init {root}/retrofit" in line and f"--steps {grid.STEPS}" in line
    assert lines[1].replace("--passes 1", "--passes 2").replace("/n1", "/n2") == lines[2]  # same data, same steps
    for _, argv in plan(root):
        check_options(argv)  # every flag exists in the CLI


def test_retrofit_runner_resumes_and_skips_what_is_done(tmp_path):
    from experiments.retrofit import grid
    from experiments.retrofit.run import plan

    root = tmp_path / "r"
    (root / "retrofit").mkdir(parents=True)
    (root / "retrofit" / "config.json").write_text("{}")
    for name, step in (("n1", grid.STEPS), ("n2", 5)):  # n1 finished, n2 interrupted at step 5
        (root / name / "checkpoint").mkdir(parents=True)
        (root / name / "checkpoint" / "trainer_state.json").write_text(json.dumps({"step": step}))
    todo = plan(str(root))
    assert [name for name, _ in todo] == ["n2", "sleep-eval"] and todo[0][1][-1] == "--resume"
    (root / "n2" / "checkpoint" / "trainer_state.json").write_text(json.dumps({"step": grid.STEPS}))
    (root / "sleep_eval.json").write_text("{}")
    assert plan(str(root)) == []


def test_retrofit_report_writes_the_table_between_the_markers(tmp_path):
    from experiments.retrofit.report import BEGIN, END, main
    from lmsleep.sleepeval import EVICTED, WHOLE

    root = tmp_path / "r"
    rows = [{"model": WHOLE, "window": 96, "trained_passes": None, "passes": 1, "acc_k1": 0.9, "acc_k2": 0.8,
             "acc": 0.85, "chance": 0.01, "loss": 1.0},
            {"model": EVICTED, "window": 32, "trained_passes": 1, "passes": 1, "acc_k1": 0.0, "acc_k2": 0.0,
             "acc": 0.0, "chance": 0.01, "loss": 5.0}]
    rows += [{"model": f"trained N={n}", "window": 32, "trained_passes": n, "passes": m, "acc_k1": 0.1 * n,
              "acc_k2": 0.05 * n, "acc": 0.07 * n, "chance": 0.01, "loss": 3.0} for n in (1, 2) for m in (1, 2)]
    root.mkdir()
    (root / "sleep_eval.json").write_text(json.dumps({"results": rows}))
    for n in (1, 2):
        (root / f"n{n}").mkdir()
        recs = [{"step": s, "loss": 4.0 - s / 100, "elapsed": 40.0 * n * s} for s in (1, 2)]
        recs[-1]["eval_acc"] = 0.1
        (root / f"n{n}" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    doc = tmp_path / "RESULTS.md"
    doc.write_text(f"# Results\n\nbefore\n{BEGIN}\nold\n{END}\nafter\n")
    assert main(["--root", str(root), "--into", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# Results\n\nbefore\n") and text.endswith(f"{END}\nafter\n") and "old" not in text
    assert "| whole context | 96 | - | 1 | 0.900 | 0.800 |" in text
    assert "| N = 2 | 2 | 160 | 80.0 | 3.980 | 0.100 (step 2) |" in text
    assert "lmsleep sleep-eval" in text


def test_gpu_recipe_commands_and_estimate():
    from experiments.gpu.recipe import PROFILES, commands, estimate, train_sets, validate

    p = PROFILES["qwen2.5-1.5b"]
    cmds = commands(p, "runs/gpu", gpus=8)
    assert [name for name, _ in cmds] == ["retrofit", "n1", "n2", "n4", "sleep-eval"]
    assert cmds[0][1][:2] == ["retrofit", "Qwen/Qwen2.5-1.5B"] and "7:21" in cmds[0][1]
    train = cmds[1][1]
    assert "--nproc" in train and "grad_accum=32" in train  # 256 = 1 x 8 GPUs x 32
    assert {"muon_lr": 1e-3, "adamw_lr": 5e-5, "batch_size": 256}.items() <= train_sets(p, 8).items()
    lines = validate(p, "runs/gpu", 8)
    assert any("35 blocks (7 SSM)" in line for line in lines) and any("T = 3300" in line for line in lines)
    rows = estimate(p)
    assert [r["passes"] for r in rows] == [1, 2, 4]
    assert rows[0]["total_gib"] < rows[1]["total_gib"] < rows[2]["total_gib"] < 141  # one H200
    with pytest.raises(ValueError, match="not a multiple"):
        train_sets(p, 3)


def test_gpu_recipe_dry_run_trains_one_step_on_a_tiny_model(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    from experiments.gpu.recipe import PROFILES, dry_run

    assert dry_run(PROFILES["qwen2.5-1.5b"], "runs/gpu", 1, tiny_root=str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "ok train config: batch 256 = 1 x 1 GPUs x 256 accumulation" in out
    assert "ok tiny run: 8" in out  # 2 bounds, 2 x 2 trained, 2 trained whole context
    for n in (1, 2):
        lines = (tmp_path / "tiny" / f"n{n}" / "metrics.jsonl").read_text().splitlines()
        metrics = [json.loads(line) for line in lines]
        assert metrics[-1]["step"] == 1
    rows = json.loads((tmp_path / "tiny" / "sleep_eval.json").read_text())["results"]
    assert rows[0]["model"] == "whole context" and rows[0]["window"] == 512


def test_retrofit_report_of_unfinished_runs_shows_their_progress(tmp_path):
    from experiments.retrofit.report import section

    (tmp_path / "n1").mkdir()
    (tmp_path / "n1" / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": 5.0, "elapsed": 120.0}) + "\n")
    text = section(str(tmp_path))
    assert "Not finished yet" in text and "| N = 1 | 3 | 120 | 40.0 | 5.000 | - |" in text
    assert "| N = 2 | not run |" in text
    with pytest.raises(SystemExit):
        section(str(tmp_path / "empty"))
