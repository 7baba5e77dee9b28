"""`python -m train.cifar` end to end on data made here: outputs, TFLite parity,
resume after a crash, --evaluate, --init-from, bad input, tf.distribute."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from reste_larq import callbacks as cb
from tests.test_data import write_cifar10
from train import cifar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--epochs", "1", "-b", "16", "--batch-size-test", "16", "--verbose", "0",
         "--no-download"]


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(str(root), n_per_batch=16)  # 80 train, 16 test images
    return str(root)


def run_cli(*argv):
    return cifar.main([str(a) for a in argv])


def read_metrics(run):
    with open(os.path.join(run, "metrics.json")) as f:
        return json.load(f)


def history(run):
    with open(os.path.join(run, "history.csv")) as f:
        return list(csv.DictReader(f))


def check_outputs(run, quantizer="reste"):
    for name in ("checkpoint", "history.csv", "logs", "metrics.json", "model.tflite",
                 "args.json", "final.weights.h5", "best.weights.h5"):
        assert os.path.exists(os.path.join(run, name)), name
    assert any(f.startswith("events") for _, _, fs in os.walk(os.path.join(run, "logs")) for f in fs)
    m = read_metrics(run)
    for key in ("test_top1", "test_top5", "epochs", "quantizer", "model", "args",
                "tflite_test_top1", "tflite_bytes"):
        assert key in m, key
    assert m["quantizer"] == quantizer and m["model"] == "resnet20_1w1a"
    assert abs(m["tflite_test_top1"] - m["test_top1"]) <= 1.0
    assert m["tflite_lce_bconv2d"] == m["binary_convs"] == 18
    assert m["tflite_bytes"] == os.path.getsize(os.path.join(run, "model.tflite"))
    return m


def test_end_to_end_on_official_cifar_folder(cifar_dir, tmp_path):
    assert run_cli("--data-dir", cifar_dir, "--results-dir", tmp_path, "--name", "run",
                   "--indicators", "--warmup", "1", *QUICK, "--epochs", "2") == 0
    run = str(tmp_path / "run")
    m = check_outputs(run)
    rows = history(run)
    assert [float(r["o"]) for r in rows] == pytest.approx([1.0, cb.cosine_ramp(1, 2, 1, 3)])
    assert all(np.isfinite(float(r["gradient_stability"])) for r in rows)
    assert m["args"]["warmup"] == 1 and m["epochs"] == 2

    # --evaluate reproduces the saved metrics from the checkpoint
    assert run_cli("--evaluate", run, "--data-dir", cifar_dir, "--results-dir", tmp_path,
                   "--verbose", "0", "--no-download") == 0


def test_evaluate_reproduces_metrics(cifar_dir, tmp_path, capsys):
    assert run_cli("--data-dir", cifar_dir, "--results-dir", tmp_path, "--name", "run",
                   "--quantizer", "bnnpp", *QUICK) == 0
    saved = check_outputs(str(tmp_path / "run"), quantizer="bnnpp")
    capsys.readouterr()
    assert run_cli("--evaluate", tmp_path / "run", "--data-dir", cifar_dir, "--no-download") == 0
    printed = json.loads(capsys.readouterr().out)
    for key in ("test_top1", "test_top5", "tflite_test_top1"):
        assert printed[key] == saved[key], key


def test_end_to_end_with_tfds_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=48):
        assert run_cli("--dataset", "cifar10", "--results-dir", tmp_path, "--name", "mock",
                       *QUICK) == 0
    check_outputs(str(tmp_path / "mock"))


class Killed(Exception):
    pass


def test_resume_after_crash_ends_where_uninterrupted_run_ends(cifar_dir, tmp_path, monkeypatch, capsys):
    common = ["--data-dir", cifar_dir, "--results-dir", tmp_path, *QUICK, "--epochs", "3",
              "--no-export", "--quantizer", "reste"]
    assert run_cli(*common, "--name", "straight") == 0

    original = cb.LearningRateSchedule.on_epoch_begin

    def crash_at_epoch_2(self, epoch, logs=None):
        if epoch == 2:
            raise Killed("simulated kill at the start of epoch 3")
        original(self, epoch, logs)

    monkeypatch.setattr(cb.LearningRateSchedule, "on_epoch_begin", crash_at_epoch_2)
    with pytest.raises(Killed):
        run_cli(*common, "--name", "crashed")
    monkeypatch.setattr(cb.LearningRateSchedule, "on_epoch_begin", original)
    crashed = str(tmp_path / "crashed")
    assert not os.path.exists(os.path.join(crashed, "metrics.json"))  # not mistaken for done

    capsys.readouterr()
    assert run_cli(*common, "--name", "crashed") == 2  # an unfinished run is not overwritten
    assert "--resume" in capsys.readouterr().err

    assert run_cli(*common, "--name", "crashed", "--resume", "--seed", "7") == 2
    assert "--seed 7 (run has 1234)" in capsys.readouterr().err
    assert run_cli(*common, "--name", "crashed", "--resume") == 0
    assert "resuming" in capsys.readouterr().out
    straight, resumed = history(str(tmp_path / "straight")), history(crashed)
    assert [r["epoch"] for r in resumed] == ["0", "1", "2"]
    for a, b in zip(straight, resumed):
        assert float(a["o"]) == pytest.approx(float(b["o"]))
        assert float(a["lr"]) == pytest.approx(float(b["lr"]))
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-3)
    m1, m2 = read_metrics(str(tmp_path / "straight")), read_metrics(crashed)
    assert m1["test_top1"] == m2["test_top1"] and m1["test_top5"] == m2["test_top5"]


def test_init_from_a32_run(cifar_dir, tmp_path):
    common = ["--data-dir", cifar_dir, "--results-dir", tmp_path, *QUICK, "--no-export"]
    assert run_cli(*common, "--a32", "--name", "stage1") == 0
    assert run_cli(*common, "--name", "stage2", "--init-from", tmp_path / "stage1",
                   "--lr", "1e-12", "--weight-decay", "0") == 0
    from reste_larq import models

    def kernels(run, a32):
        model = models.build("resnet20_1w1a", a32=a32)
        model.load_weights(os.path.join(run, "final.weights.h5"))
        return [l.kernel.numpy() for l in model.layers if hasattr(l, "kernel")]

    for a, b in zip(kernels(tmp_path / "stage1", True), kernels(tmp_path / "stage2", False)):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet21"], "invalid choice: 'resnet21'"),
    (["--quantizer", "sgn"], "unknown quantizer 'sgn'; choose one of"),
    (["--dataset", "svhn"], "invalid choice: 'svhn'"),
    (["--epochs", "-1"], "must be a positive integer"),
    (["--data-dir", "/nonexistent/cifar"], "cifar-10-python.tar.gz"),
    (["--resume", "--name", "never-ran"], "no checkpoint"),
    (["--evaluate", "/nonexistent/run"], "not a run folder"),
    (["--o-end", "0.5"], "--o-end must be >= 1"),
])
def test_bad_input_exits_with_one_line(argv, message, tmp_path, capsys):
    try:
        code = run_cli("--results-dir", tmp_path, "--no-download", *argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not os.path.exists(tmp_path / "never-ran" / "metrics.json")


def test_cli_subprocess_error_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "train.cifar", "--data-dir", str(tmp_path / "missing"),
         "--results-dir", str(tmp_path), "--no-download"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: data directory")


def test_mirrored_strategy_on_two_logical_cpus(cifar_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "train.cifar", "--data-dir", cifar_dir, "--results-dir",
         str(tmp_path), "--name", "dist", "--strategy", "mirrored", "--logical-cpus", "2",
         *QUICK, "--no-export"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    m = read_metrics(str(tmp_path / "dist"))
    assert m["args"]["strategy"] == "mirrored" and 0 <= m["test_top1"] <= 100


def test_sync_bn_is_used_for_distributed_models():
    from reste_larq import models

    bns = lambda m: [l for l in m.layers if isinstance(l, tf.keras.layers.BatchNormalization)]  # noqa: E731
    assert all(l.synchronized for l in bns(models.build("resnet20_1w1a", sync_bn=True)))
    assert not any(l.synchronized for l in bns(models.build("resnet20_1w1a")))


def test_weight_decay_is_coupled_l2_on_every_weight():
    from train.common import add_weight_decay
    from reste_larq import models

    model = models.build("resnet20_1w1a", input_shape=(8, 8, 3))
    add_weight_decay(model, 1e-4)
    expected = 0.5 * 1e-4 * sum(float(np.sum(np.square(w.numpy()))) for w in model.trainable_weights)
    assert float(model.losses[0]) == pytest.approx(expected, rel=1e-5)
    # BN parameters are included, as PyTorch SGD's weight_decay includes them
    assert any("gamma" in w.name for w in model.trainable_weights)
