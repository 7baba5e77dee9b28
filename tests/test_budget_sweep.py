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
    os.makedirs(run)
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
