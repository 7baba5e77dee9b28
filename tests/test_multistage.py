"""`python -m train.multistage`: float teacher -> binary stages in one folder,
initialized stage to stage, distilled from the teacher, resumable, with clear errors."""

import json
import os

import numpy as np
import pytest

from reste_larq import callbacks as cb
from reste_larq import models
from tests.test_train import QUICK, Killed, check_outputs, history, read_metrics
from train import multistage


def run_cli(*argv):
    return multistage.main([str(a) for a in argv])


def kernels(run, **build_options):
    model = models.build("resnet20_1w1a", **build_options)
    model.load_weights(os.path.join(run, "final.weights.h5"))
    return [l.kernel.numpy() for l in model.layers if hasattr(l, "kernel")]


def test_three_stages_chain_distill_and_export(cifar_dir, tmp_path, capsys):
    argv = ["--data-dir", cifar_dir, "--results-dir", tmp_path, *QUICK, "--name", "ms"]
    # A rate too small to move weights: each stage must end with the weights it started
    # from, so equal kernels across stages show the chain of --init-from.
    frozen = ["--lr", "1e-12", "--weight-decay", "0"]
    assert run_cli(*argv, *frozen, "--stages", "float,w32,1w1a") == 0
    out = capsys.readouterr().out
    folder = tmp_path / "ms"
    stages = ["1_float", "2_w32", "3_1w1a"]
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == stages
    for stage in stages:  # every stage: outputs, metrics, a .tflite
        assert os.path.isfile(folder / stage / "model.tflite"), stage
        assert stage in out
    m = check_outputs(str(folder / "3_1w1a"))  # 18 LceBconv2d, TFLite = Keras
    for stage in stages[1:]:  # distilled from the float stage
        assert read_metrics(str(folder / stage))["teacher"] == str(folder / "1_float")
        assert "kd_loss" in history(str(folder / stage))[0]
    assert "teacher" not in read_metrics(str(folder / "1_float"))
    w32 = read_metrics(str(folder / "2_w32"))
    assert w32["args"]["w32"] and w32["tflite_lce_bconv2d"] == 0
    for a, b, c in zip(
        kernels(folder / "1_float", quantizer="float"),
        kernels(folder / "2_w32", w32=True),
        kernels(folder / "3_1w1a"),
    ):
        np.testing.assert_allclose(a, b, atol=1e-6)
        np.testing.assert_allclose(b, c, atol=1e-6)
    rows = json.loads((folder / "stages.json").read_text())
    assert [r["stage"] for r in rows] == stages
    assert rows[-1]["test_top1"] == m["test_top1"]
    assert rows[-1]["tflite_lce_bconv2d"] == 18


@pytest.mark.slow  # end to end; default-suite guard: docs/testing.md
def test_rerun_continues_at_the_first_unfinished_stage(cifar_dir, tmp_path, monkeypatch, capsys):
    argv = [
        "--data-dir",
        cifar_dir,
        "--results-dir",
        tmp_path,
        *QUICK,
        "--no-export",
        "--name",
        "ms",
        "--stages",
        "float,1w1a",
        "--epochs-per-stage",
        "1",
        "2",
    ]
    original = cb.LearningRateSchedule.on_epoch_begin
    calls = []

    def crash(self, epoch, logs=None):  # dies as stage 2's second epoch begins
        calls.append(epoch)
        if len(calls) == 3:
            raise Killed("simulated kill in stage 2")
        original(self, epoch, logs)

    monkeypatch.setattr(cb.LearningRateSchedule, "on_epoch_begin", crash)
    with pytest.raises(Killed):
        run_cli(*argv)
    monkeypatch.setattr(cb.LearningRateSchedule, "on_epoch_begin", original)
    folder = tmp_path / "ms"
    first = (folder / "1_float" / "metrics.json").read_text()
    assert not (folder / "2_1w1a" / "metrics.json").exists()
    capsys.readouterr()

    assert run_cli(*argv, "--seed", "7") == 2  # other settings: refused, nothing touched
    assert "--seed" in capsys.readouterr().err
    assert run_cli(*argv) == 0
    out = capsys.readouterr().out
    assert "stage 1_float: finished earlier" in out and "resuming" in out
    assert (folder / "1_float" / "metrics.json").read_text() == first  # not trained again
    assert [r["epoch"] for r in history(str(folder / "2_1w1a"))] == ["0", "1"]
    assert read_metrics(str(folder / "2_1w1a"))["epochs"] == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--stages", "float,float"], "float can only be the first stage"),
        (["--stages", "w32,2w2a"], "unknown stage(s) 2w2a"),
        (["--stages", "float,1w1a", "--epochs-per-stage", "1", "2", "3"], "3 counts for 2"),
        (["--teacher", "elsewhere"], "--teacher: the multi-stage command sets"),
        (["--w32"], "--w32: the multi-stage command sets"),
        (["--quantizer", "float", "--stages", "float,1w1a"], "binary stages need an estimator"),
    ],
)
def test_bad_stage_settings_are_one_line_errors(cifar_dir, tmp_path, capsys, extra, message):
    argv = ["--data-dir", cifar_dir, "--results-dir", tmp_path / "r", *QUICK, *extra]
    try:
        code = run_cli(*argv)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1], err
    assert not os.path.exists(tmp_path / "r")
