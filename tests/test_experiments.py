"""experiments/: every run of the grid is a valid `lmsleep train` command, and the report aggregates
finished runs into the right tables, JSON and plots."""

import json

import pytest

from common.training import build_run
from experiments import grid, report
from lmsleep.cli import cli, parse_pairs


def test_every_run_parses_and_builds():
    names = [r.name for r in grid.runs()]
    assert len(names) == len(set(names))
    for run in grid.runs():
        argv = run.train_argv("root")
        ctx = cli.commands["train"].make_context("train", argv[1:])  # parse only, train nothing
        p = ctx.params
        task, mc, tc = build_run(p["task"], parse_pairs(p["task_args"]), p["preset"], parse_pairs(p["sets"]),
                                 passes=p["passes"], steps=p["steps"])
        assert (mc.sleep_passes, tc.steps, tc.seed, tc.batch_size) == (run.passes, run.steps, run.seed, grid.BATCH)
        assert mc.window == task.window and p["out"] == f"root/{run.name}"
        eval_ctx = cli.commands["eval"].make_context("eval", run.eval_argv("root")[1:])
        assert eval_ctx.params["passes"] == grid.EVAL_PASSES


def test_depo_setting_never_wraps_to_the_query_node():
    """The evaluated k are never a multiple of a cycle length, so the answer is never the query's node."""
    for n in range(grid.DEPO_ARGS["min_nodes"], grid.DEPO_ARGS["max_nodes"] + 1):
        assert all(k % n for k in report.DEPO_KS), n


def fake_run(root, name, steps, wall, evals):
    folder = root / name
    folder.mkdir(parents=True)
    records = [{"step": s, "loss": 1.0, "elapsed": wall * s / steps, **{f"eval_{k}": v for k, v in evals[0].items()
                                                                          if k not in ("passes", "trained_passes")}}
               for s in (steps // 2, steps)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "eval.json").write_text(json.dumps({"results": evals}))  # as `lmsleep eval --json FILE` writes it


def rule_row(passes, trained, exact):
    return {"passes": passes, "trained_passes": trained, "exact": exact, "per_answer": 0.5 + exact / 2,
            "majority_exact": 0.1, "chance_exact": 0.0625, "loss": 0.5}


def test_report_tables_and_plots(tmp_path):
    root = tmp_path / "runs"
    fake_run(root, "rule110-t1-n1-s0", 400, 100.0, [rule_row(m, 1, 0.30) for m in range(1, 5)])
    fake_run(root, "rule110-t1-n1-s1", 400, 110.0, [rule_row(m, 1, 0.50) for m in range(1, 5)])
    fake_run(root, "rule110-t1-n4-s0", 400, 380.0, [rule_row(m, 4, 0.2 * m) for m in range(1, 5)])
    depo = [{"passes": m, "trained_passes": 2, "acc": 0.4, **{f"acc_k{k}": 0.1 * m + k / 100 for k in range(1, 17)}}
            for m in range(1, 5)]
    fake_run(root, "depo-n2-s0", 800, 300.0, depo)
    fake_run(root, "rule110-t2-n4-1200steps-s0", 1200, 1400.0, [rule_row(m, 4, 0.2) for m in range(1, 5)])
    fake_run(root, "rule110-t2-n1-1200steps-s0", 1200, 400.0, [rule_row(m, 1, 0.1) for m in range(1, 5)])
    fake_run(root, "rule110-t2-n1-long-s0", 4400, 1500.0, [rule_row(m, 1, 0.1) for m in range(1, 5)])
    (root / "rule110-t2-n1-s0").mkdir()  # unfinished: no eval.json, left out
    tables, plots = tmp_path / "tables", tmp_path / "plots"
    doc = tmp_path / "RESULTS.md"
    doc.write_text(f"# Results\nprose\n{report.BEGIN}\nold tables\n{report.END}\nmore prose\n")
    assert report.main(["--root", str(root), "--tables", str(tables), "--plots", str(plots), "--into", str(doc)]) == 0
    spliced = doc.read_text()
    assert spliced.startswith("# Results\nprose\n") and spliced.endswith(f"{report.END}\nmore prose\n")
    assert "old tables" not in spliced and (tables / "tables.md").read_text() in spliced
    text = (tables / "tables.md").read_text()
    assert "| 1 | 0.400 ± 0.100 |" in text  # the mean ± sd over seeds 0 and 1 of N = 1
    assert "| 4 | 0 | 0.800 |" in text  # N = 4 scored at its trained N
    assert "| 4 | 0.200 | 0.400 | 0.600 | 0.800 |" in text  # cross-N row of the N = 4 model
    assert "| 2 | 0 | 0.210 | 0.220 | 0.240 | 0.280 | 0.360 | 0.400 | 300 |" in text  # depo per k at N = 2
    # equal wall time: N = 1 (long run) at N = 4's 1400 s is its step-2200 evaluation; N = 4 has none by 400 s
    assert "| 0 | 0.200 | 1400 | 0.100 (step 2200) | 0.100 | 400 | - |" in text
    assert "| 1 (4400 steps) | 0 | 0.100 |" in text
    assert "rule110-t2-n1-s0" not in text and "--out runs/experiments/rule110-t1-n4-s0" not in text
    summary = json.loads((tables / "summary.json").read_text())
    assert sorted(summary) == ["depo-n2-s0", "rule110-t1-n1-s0", "rule110-t1-n1-s1", "rule110-t1-n4-s0",
                               "rule110-t2-n1-1200steps-s0", "rule110-t2-n1-long-s0", "rule110-t2-n4-1200steps-s0"]
    assert summary["rule110-t1-n4-s0"]["wall_s"] == 380.0
    pytest.importorskip("matplotlib")
    assert {p.name for p in plots.iterdir()} == {"rule110_curves.png", "rule110_walltime.png",
                                                  "rule110_acc_vs_n.png", "depo_per_k.png"}


def test_report_without_runs_fails_cleanly(tmp_path, capsys):
    assert report.main(["--root", str(tmp_path), "--tables", str(tmp_path / "t"), "--plots", str(tmp_path)]) == 1
    assert "no finished runs" in capsys.readouterr().err


def test_partial_information_ceilings():
    """The plateaus RESULTS.md explains: what a predictor scores knowing only some of the 2t+1 bits."""
    assert report.ceiling(1, (-1, 0, 1)) == 1.0 and report.ceiling(2, (-2, -1, 0, 1, 2)) == 1.0
    assert report.ceiling(1, ()) == 5 / 8  # Rule 110 maps 5 of its 8 neighbourhoods to 1
    assert report.ceiling(1, (0, 1)) == 7 / 8  # without the left neighbour: wrong only on 1,1,1 vs 0,1,1
    assert report.ceiling(2, (0, 2)) == report.ceiling(2, (0, 1, 2)) == 23 / 32
    assert report.ceiling(2, (-1, 0, 1, 2)) == 31 / 32


def test_runner_trains_until_the_checkpoint_has_every_step(tmp_path):
    from experiments import run as runner

    folder = tmp_path / "r"
    assert runner.trained_steps(folder) == 0
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "model").mkdir()  # written at every checkpoint, so it says nothing about being finished
    (folder / "checkpoint" / "trainer_state.json").write_text(json.dumps({"step": 300}))
    assert runner.trained_steps(folder) == 300
