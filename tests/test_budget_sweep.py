"""benchmarks/budget_sweep.py's report mode: tables from finished cells, no training."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def budget_sweep():
    spec = importlib.util.spec_from_file_location(
        "budget_sweep", os.path.join(ROOT, "benchmarks", "budget_sweep.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _finished_cell(results_dir, name, top1, frozen, best):
    run = os.path.join(results_dir, name)
    os.makedirs(run, exist_ok=True)
    per_epoch = [{"epoch": 0, "val_accuracy": top1 / 100, "frozen_fraction": frozen}]
    with open(os.path.join(run, "metrics.json"), "w") as f:
        json.dump({"test_top1": top1, "best_test_top1": best, "per_epoch": per_epoch}, f)


def test_report_tabulates_finished_cells_and_marks_missing_ones(budget_sweep, tmp_path, capsys):
    _finished_cell(tmp_path, "fashion_mnist_n100_e2_reste_s1", 61.25, 0.0, 63.5)
    _finished_cell(tmp_path, "fashion_mnist_n100_e2_bnnpp_mu_end50_s1", 47.5, 0.25, 47.5)
    budget_sweep.main(
        [
            "--report", "--no-plot", "--results-dir", str(tmp_path), "--seeds", "1",
            "--train-limits", "100", "--epochs", "2", "5",
            "--variants", "reste", "bnnpp,mu_end=50",
        ]
    )  # fmt: skip
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["reste", "61.25", "-"] in rows
    assert ["reste", "63.50", "-"] in rows  # the best-epoch table, beside the final one
    assert ["bnnpp,mu_end=50", "47.50", "-"] in rows
    assert ["bnnpp,mu_end=50", "25.00", "-"] in rows  # the frozen-fraction table
    # Nothing was trained for the missing 5-epoch cells.
    assert sorted(os.listdir(tmp_path)) == [
        "fashion_mnist_n100_e2_bnnpp_mu_end50_s1",
        "fashion_mnist_n100_e2_reste_s1",
    ]


def test_report_without_finished_cells_is_an_error(budget_sweep, tmp_path, capsys):
    with pytest.raises(SystemExit):
        budget_sweep.main(["--report", "--no-plot", "--results-dir", str(tmp_path)])
    assert "no finished cell" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_variant_settings_become_train_cifar_flags(budget_sweep):
    parser = budget_sweep.argparse.ArgumentParser()
    assert budget_sweep.parse_variant("bnnpp,mu_start=10,mu_end=50", parser) == (
        "bnnpp",
        ["--mu-start", "10", "--mu-end", "50"],
    )
    with pytest.raises(SystemExit):
        budget_sweep.parse_variant("reste,o_end", parser)


def test_biper_two_stage_cell_runs_stage1_then_stage2_from_it(budget_sweep, tmp_path, monkeypatch):
    """A `biper_two_stage` cell of 5 epochs: biper_stage1 for 3, then biper for 2 with
    --init-from the stage-1 run; the cell's metrics are stage 2's; a finished cell is
    not run again, and an interrupted stage 1 is resumed."""
    calls = []

    def fake_main(argv):
        argv = [str(a) for a in argv]
        calls.append(argv)
        name = argv[argv.index("--name") + 1]
        top1 = 70.0 if "biper_stage1" in argv else 80.0
        _finished_cell(tmp_path, name, top1, 0.0, top1)
        return 0

    monkeypatch.setattr(budget_sweep.cifar, "main", fake_main)
    grid = [
        "--no-plot", "--results-dir", str(tmp_path), "--seeds", "1", "--train-limits", "100",
        "--epochs", "5", "--variants", "biper_two_stage",
    ]  # fmt: skip
    budget_sweep.main(grid)
    cell = "fashion_mnist_n100_e5_biper_two_stage_s1"
    assert len(calls) == 2
    first, second = calls
    flag = lambda argv, name: argv[argv.index(name) + 1]  # noqa: E731
    assert (flag(first, "--quantizer"), flag(first, "--epochs")) == ("biper_stage1", "3")
    assert flag(first, "--name") == f"{cell}_stage1" and "--init-from" not in first
    assert (flag(second, "--quantizer"), flag(second, "--epochs")) == ("biper", "2")
    assert flag(second, "--name") == cell
    assert flag(second, "--init-from") == os.path.join(str(tmp_path), f"{cell}_stage1")
    budget_sweep.main(grid)
    assert len(calls) == 2  # finished: nothing runs again

    # Stage 1 interrupted (a checkpoint, no metrics): it resumes, then stage 2 starts.
    calls.clear()
    other = "fashion_mnist_n100_e10_biper_two_stage_s1"
    os.makedirs(os.path.join(tmp_path, f"{other}_stage1", "checkpoint"))
    budget_sweep.main([*grid[:-4], "--epochs", "10", "--variants", "biper_two_stage"])
    assert [flag(c, "--epochs") for c in calls] == ["7", "3"]
    assert "--resume" in calls[0] and "--resume" not in calls[1]
    assert [flag(c, "--warmup") for c in calls] == ["1", "1"]
    calls.clear()  # a 2-epoch cell: two 1-epoch stages, neither warms up (no room)
    budget_sweep.main([*grid[:-4], "--epochs", "2", "--variants", "biper_two_stage"])
    assert [(flag(c, "--epochs"), flag(c, "--warmup")) for c in calls] == [("1", "0")] * 2
    assert budget_sweep.two_stage_epochs(2) == (1, 1)
    with pytest.raises(SystemExit):
        budget_sweep.two_stage_epochs(1)


def test_quoted_cells_fill_only_cells_without_a_run_folder(budget_sweep, tmp_path, capsys):
    """--quoted: earlier measurements fill the grid's empty cells, marked with their
    source; a cell's own run folder wins; a malformed quote or a sweep that would train
    is an error."""
    _finished_cell(tmp_path, "fashion_mnist_n100_e2_reste_s1", 61.25, 0.0, 63.5)
    quoted = tmp_path / "quoted.json"
    cell = {"train_limit": 100, "seed": 1, "best_test_top1": None, "source": "TF 2.15, 11-28"}
    quoted.write_text(
        json.dumps(
            [
                {**cell, "variant": "reste", "epochs": 2, "test_top1": 10.0},  # has a run
                {**cell, "variant": "reste", "epochs": 5, "test_top1": 70.5},
                {
                    **cell,
                    "variant": "bnnpp",
                    "epochs": 5,
                    "test_top1": 80.0,
                    "frozen_percent": 95.0,
                },
                {**cell, "variant": "bnnpp", "epochs": 5, "test_top1": 0.0, "seed": 9},  # not asked
                {**cell, "variant": "ste", "epochs": 5, "test_top1": 1.0},  # not in --variants
            ]
        )
    )
    argv = [
        "--report", "--no-plot", "--results-dir", str(tmp_path), "--seeds", "1",
        "--train-limits", "100", "--epochs", "2", "5", "--variants", "reste", "bnnpp",
    ]  # fmt: skip
    budget_sweep.main([*argv, "--quoted", str(quoted)])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()]
    assert ["reste", "61.25", "70.50*"] in rows  # final epoch: the run, then the quote
    assert ["reste", "63.50", "-"] in rows  # the quote has no best epoch
    assert ["bnnpp", "-", "80.00*"] in rows
    assert ["bnnpp", "-", "95.00*"] in rows  # frozen fraction
    assert f"* quoted from {quoted}: TF 2.15, 11-28" in out
    assert "10.00" not in out and "1.00*" not in out

    quoted.write_text(json.dumps([{"variant": "reste", "epochs": 5}]))
    with pytest.raises(SystemExit):
        budget_sweep.main([*argv, "--quoted", str(quoted)])
    assert "cell 0 has no seed, source, test_top1, train_limit" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        budget_sweep.main([*argv[1:], "--quoted", str(quoted)])
    assert "--quoted is for --report" in capsys.readouterr().err
