"""`python -m train.cifar` end to end on data made here: outputs, TFLite parity,
resume after a crash, --evaluate, --init-from, bad input, tf.distribute."""

import csv
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from reste_larq import callbacks as cb
from reste_larq import experiment, rundir
from reste_larq import quantizers as Q
from train import cifar, common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--epochs", "1", "-b", "16", "--batch-size-test", "16", "--verbose", "0", "--no-download"]


def run_cli(*argv):
    return cifar.main([str(a) for a in argv])


def read_metrics(run):
    with open(os.path.join(run, "metrics.json")) as f:
        return json.load(f)


def read_args(run):
    with open(os.path.join(run, "args.json")) as f:
        return json.load(f)


def history(run):
    with open(os.path.join(run, "history.csv")) as f:
        return list(csv.DictReader(f))


def check_outputs(run, quantizer="reste"):
    for name in (
        "checkpoint",
        "history.csv",
        "logs",
        "metrics.json",
        "model.tflite",
        "args.json",
        "final.weights.h5",
        "best.weights.h5",
    ):
        assert os.path.exists(os.path.join(run, name)), name
    assert any(
        f.startswith("events") for _, _, fs in os.walk(os.path.join(run, "logs")) for f in fs
    )
    m = read_metrics(run)
    for key in (
        "test_top1",
        "test_top5",
        "epochs",
        "quantizer",
        "model",
        "args",
        "tflite_test_top1",
        "tflite_bytes",
    ):
        assert key in m, key
    assert m["quantizer"] == quantizer and m["model"] == "resnet20_1w1a"
    assert abs(m["tflite_test_top1"] - m["test_top1"]) <= 1.0
    assert m["tflite_lce_bconv2d"] == m["binary_convs"] == 18
    assert m["tflite_bytes"] == os.path.getsize(os.path.join(run, "model.tflite"))
    # per epoch: the schedule's values and the frozen fraction, as history.csv has them
    assert [e["epoch"] for e in m["per_epoch"]] == list(range(m["epochs"]))
    for entry, row in zip(m["per_epoch"], history(run)):
        assert 0.0 <= entry["frozen_fraction"] <= 1.0
        assert entry["frozen_fraction"] == float(row["frozen_fraction"])
        assert entry["lr"] == float(row["lr"])
        if quantizer == "reste":
            assert entry["o"] == float(row["o"])
    return m


def test_end_to_end_on_official_cifar_folder(cifar_dir, tmp_path, capsys):
    assert (
        run_cli(
            "--data-dir",
            cifar_dir,
            "--results-dir",
            tmp_path,
            "--name",
            "run",
            "--indicators",
            "--warmup",
            "1",
            *QUICK,
            "--epochs",
            "2",
        )
        == 0
    )
    run = str(tmp_path / "run")
    m = check_outputs(run)
    rows = history(run)
    assert [float(r["o"]) for r in rows] == pytest.approx([1.0, cb.cosine_ramp(1, 2, 1, 3)])
    assert all(np.isfinite(float(r["gradient_stability"])) for r in rows)
    assert m["args"]["warmup"] == 1 and m["epochs"] == 2

    # --evaluate reproduces the saved metrics from the checkpoint
    capsys.readouterr()
    assert (
        run_cli(
            "--evaluate",
            run,
            "--data-dir",
            cifar_dir,
            "--results-dir",
            tmp_path,
            "--verbose",
            "0",
            "--no-download",
            "--no-export",  # the same export function as the run's, checked above
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["evaluated_epoch"] == 2
    for key in ("test_top1", "test_top5", "o_final"):
        assert printed[key] == m[key], key


def test_end_to_end_with_tfds_mock_data_rotation_and_mixup(tmp_path):
    """The TFDS path (its export: test_end_to_end_on_official_cifar_folder), with --rotate
    and --mixup: soft training labels, integer test labels, one metric name for both
    (val_accuracy drives the best checkpoint)."""
    with tfds.testing.mock_data(num_examples=48):
        assert (
            run_cli(
                "--dataset",
                "cifar10",
                "--results-dir",
                tmp_path,
                "--name",
                "mock",
                *QUICK,
                "--no-export",
                "--rotate",
                "15",
                "--mixup",
                "0.2",
            )
            == 0
        )
    m = read_metrics(str(tmp_path / "mock"))
    assert m["dataset"] == "cifar10" and 0 <= m["test_top1"] <= 100
    (row,) = history(str(tmp_path / "mock"))
    assert 0.0 <= float(row["accuracy"]) <= 1.0 and 0.0 <= float(row["val_accuracy"]) <= 1.0
    assert (m["args"]["rotate"], m["args"]["mixup"]) == (15.0, 0.2)
    assert m["best_test_top1"] == pytest.approx(100.0 * float(row["val_accuracy"]), abs=1e-2)


class Killed(Exception):
    pass


def run_killed_at_epoch(kill_epoch, monkeypatch, *argv):
    """Run the CLI and kill it at the start of epoch `kill_epoch` (0-based), as a
    crash would: the run folder holds what was saved up to then."""
    original = cb.LearningRateSchedule.on_epoch_begin

    def crash(self, epoch, logs=None):
        if epoch == kill_epoch:
            raise Killed(f"simulated kill at the start of epoch {epoch + 1}")
        original(self, epoch, logs)

    monkeypatch.setattr(cb.LearningRateSchedule, "on_epoch_begin", crash)
    with pytest.raises(Killed):
        run_cli(*argv)
    monkeypatch.setattr(cb.LearningRateSchedule, "on_epoch_begin", original)


def test_resume_after_crash_ends_where_uninterrupted_run_ends(
    cifar_dir, tmp_path, monkeypatch, capsys
):
    common = [
        "--data-dir",
        cifar_dir,
        "--results-dir",
        tmp_path,
        *QUICK,
        "--epochs",
        "2",
        "--no-export",
        "--quantizer",
        "reste",
    ]
    # train_seconds sums the epochs of every process of a resumed run (it was the last
    # process's alone): with a clock that advances 10 s per reading, the straight and
    # the resumed run read it equally often per trained epoch
    monkeypatch.setattr(rundir, "_clock", itertools.count(0, 10).__next__)
    assert run_cli(*common, "--name", "straight") == 0

    run_killed_at_epoch(1, monkeypatch, *common, "--name", "crashed")
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
    assert [r["epoch"] for r in resumed] == ["0", "1"]
    assert resumed == straight  # every logged value of every epoch, as written
    m1, m2 = read_metrics(str(tmp_path / "straight")), read_metrics(crashed)
    assert m1["weights_sha256"] == m2["weights_sha256"]  # the same weights, bit for bit
    assert m1["train_seconds"] == m2["train_seconds"] == 30.0  # begin, 2 epochs, end
    # what made the figure: the stack's versions and this checkout's commit
    assert m2["provenance"]["tensorflow"] == tf.__version__
    assert m2["data_source"] == f"official files in {cifar_dir}"
    assert m2["provenance"]["larq_compute_engine"] is not None
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert m2["provenance"]["commit"] == head.stdout.strip()

    # A finished run is neither resumed nor re-evaluated: --resume refuses it, and
    # --auto-resume (a restarted job) says so and exits 0 without rewriting anything.
    written = (tmp_path / "crashed" / "metrics.json").read_bytes()
    capsys.readouterr()
    assert run_cli(*common, "--name", "crashed", "--resume") == 2
    assert "holds a finished run" in capsys.readouterr().err
    assert run_cli(*common, "--name", "crashed", "--auto-resume") == 0
    assert "holds a finished run: nothing to do" in capsys.readouterr().err
    assert (tmp_path / "crashed" / "metrics.json").read_bytes() == written


def test_a_nan_epoch_keeps_the_last_finite_checkpoint(cifar_dir, tmp_path, monkeypatch, capsys):
    """Epoch 2 turns NaN: Keras still ends the epoch, and its weights must not replace
    epoch 1's checkpoint; the error names that checkpoint and how to continue from it."""
    original = cb.LearningRateSchedule.on_epoch_begin

    def poison(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch == 1:
            weight = self.model.trainable_weights[0]
            weight.assign(tf.fill(weight.shape, float("nan")))

    monkeypatch.setattr(cb.LearningRateSchedule, "on_epoch_begin", poison)
    argv = ["--data-dir", cifar_dir, "--results-dir", tmp_path, *QUICK, "--no-export"]
    assert run_cli(*argv, "--epochs", "2", "--name", "nan") == 2
    err = capsys.readouterr().err.strip().splitlines()
    run = tmp_path / "nan"
    assert len(err) == 1 and "training diverged (NaN loss) in epoch 2" in err[0], err
    assert f"the last finite checkpoint is {run}/checkpoint/ckpt-1 (epoch 1)" in err[0]
    assert f"--init-from {run} --lr 0.01" in err[0]
    reader = tf.train.load_checkpoint(str(run / "checkpoint" / "ckpt-1"))
    tensors = [reader.get_tensor(k) for k in reader.get_variable_to_shape_map()]
    floats = [t for t in tensors if np.asarray(t).dtype.kind == "f"]
    assert floats and all(np.isfinite(t).all() for t in floats)
    assert json.loads((run / "state.json").read_text())["epoch"] == 1
    # (--init-from a run folder with args.json and a checkpoint: test_init_from_a32_run)


def killed_before_its_first_checkpoint(cifar_dir, tmp_path, monkeypatch):
    """A run killed as its first epoch begins (args.json written, no checkpoint); its argv."""
    argv = ["--data-dir", cifar_dir, "--results-dir", tmp_path, *QUICK, "--no-export"]
    argv += ["--name", "r"]
    run_killed_at_epoch(0, monkeypatch, *argv)
    assert os.path.isfile(tmp_path / "r" / "args.json")
    assert tf.train.latest_checkpoint(str(tmp_path / "r" / "checkpoint")) is None
    return argv


@pytest.mark.parametrize("again", [[], ["--auto-resume"]])  # --resume: the same branch
def test_run_killed_before_its_first_checkpoint_starts_again(
    cifar_dir, tmp_path, monkeypatch, again
):
    """The same command (plain, or --auto-resume as a restarted job) starts it again."""
    argv = killed_before_its_first_checkpoint(cifar_dir, tmp_path, monkeypatch)
    assert run_cli(*argv, *again) == 0
    assert [row["epoch"] for row in history(str(tmp_path / "r"))] == ["0"]
    assert read_metrics(str(tmp_path / "r"))["epochs"] == 1


def test_run_killed_before_its_first_checkpoint_is_not_started_with_other_flags(
    cifar_dir, tmp_path, monkeypatch, capsys
):
    argv = killed_before_its_first_checkpoint(cifar_dir, tmp_path, monkeypatch)
    capsys.readouterr()
    assert run_cli(*argv, "--seed", "7") == 2
    assert "--seed 7 (run has 1234)" in capsys.readouterr().err


def test_init_from_a_run_of_another_block_stops_with_one_line(cifar_dir, tmp_path, capsys):
    """Every weight must come from --init-from's checkpoint: here the shapes differ
    (a reference-block run into --block prelu), which used to end in a traceback."""
    from reste_larq import models

    other = tmp_path / "reference"
    model = models.build("resnet20_1w1a", input_shape=(32, 32, 3), num_classes=10)
    tf.train.CheckpointManager(
        tf.train.Checkpoint(model=model), str(other / "checkpoint"), max_to_keep=1
    ).save()
    (other / "args.json").write_text(json.dumps({"model": "resnet20_1w1a", "block": "reference"}))
    argv = ["--data-dir", cifar_dir, "--results-dir", tmp_path, *QUICK, "--no-export"]
    assert run_cli(*argv, "--block", "prelu", "--name", "p", "--init-from", other) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --init-from {other}: ")
    assert "another architecture" in err[0] and "(it was trained with --block reference)" in err[0]
    assert not os.path.exists(tmp_path / "p" / "args.json")


@pytest.mark.slow  # --init-from between stages, default suite: tests/test_multistage.py
def test_init_from_a32_run(cifar_dir, tmp_path):
    common = ["--data-dir", cifar_dir, "--results-dir", tmp_path, *QUICK, "--no-export"]
    assert run_cli(*common, "--a32", "--name", "stage1") == 0
    assert (
        run_cli(
            *common,
            "--name",
            "stage2",
            "--init-from",
            tmp_path / "stage1",
            "--lr",
            "1e-12",
            "--weight-decay",
            "0",
        )
        == 0
    )
    from reste_larq import models

    def kernels(run, a32):
        model = models.build("resnet20_1w1a", a32=a32)
        model.load_weights(os.path.join(run, "final.weights.h5"))
        return [l.kernel.numpy() for l in model.layers if hasattr(l, "kernel")]

    for a, b in zip(kernels(tmp_path / "stage1", True), kernels(tmp_path / "stage2", False)):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "resnet21"], "invalid choice: 'resnet21'"),
        (["--quantizer", "sgn"], "unknown quantizer 'sgn'; choose one of"),
        (["--dataset", "svhn"], "invalid choice: 'svhn'"),
        (["--epochs", "-1"], "must be a positive integer"),
        (["--data-dir", "/nonexistent/cifar"], "cifar-10-python.tar.gz"),
        (["--resume", "--name", "never-ran"], "--resume: no run in"),
        (["--evaluate", "/nonexistent/run"], "not a run folder"),
        (["--o-end", "0.5"], "--o-end must be >= 1"),
        (["--lr-schedule", "step"], "needs its milestones"),
        (["--bn-momentum", "1.2"], "--bn-momentum must be in [0, 1)"),
        (["--lr-schedule", "sgdr", "--sgdr-mult", "0.5"], "sgdr needs period >= 1 and mult >= 1"),
        (["--model", "vgg_small_1w1a", "--block", "prelu"], "vgg_small_1w1a has its own block"),
        (["--w32", "--a32"], "nothing would be binary"),
        (["--downsample", "v2"], "resnet20_1w1a has no 1x1 conv downsample"),
        (["--model", "wrn20_10_1bit", "--dataset", "mnist"], "--mean-std dataset"),
    ],
)
def test_bad_input_exits_with_one_line(argv, message, tmp_path, capsys):
    results = tmp_path / "results"
    try:
        code = run_cli("--results-dir", results, "--no-download", *argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    # Nothing written: no run folder, no results folder, or an empty one.
    assert not results.exists() or os.listdir(results) == [], os.listdir(results)


def test_cli_subprocess_error_has_no_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.cifar",
            "--data-dir",
            str(tmp_path / "missing"),
            "--results-dir",
            str(tmp_path),
            "--no-download",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: data directory")


@pytest.mark.slow  # a subprocess tracing two replicas: a minute (default: the sync-BN flag test)
def test_mirrored_strategy_on_two_logical_cpus(cifar_dir, tmp_path):
    """Two replicas train, and what the run reports is the model it saved: the test
    top-1/top-5 in metrics.json are those of final.weights.h5 evaluated here. With
    --deterministic the same command gives the same weights twice."""
    from reste_larq import data, models

    digests = []
    for name in ("dist", "again"):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "train.cifar",
                "--data-dir",
                cifar_dir,
                "--results-dir",
                str(tmp_path),
                "--name",
                name,
                "--strategy",
                "mirrored",
                "--logical-cpus",
                "2",
                "--deterministic",
                *QUICK,
                "--no-export",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        digests.append(read_metrics(str(tmp_path / name))["weights_sha256"])
    assert digests[0] == digests[1]
    run = str(tmp_path / "dist")
    m = read_metrics(run)
    assert m["args"]["strategy"] == "mirrored" and m["deterministic"] is True
    assert [np.isfinite(float(r["loss"])) for r in history(run)] == [True]

    tf.keras.utils.set_random_seed(m["args"]["seed"])
    model = models.build("resnet20_1w1a")  # the run's initial weights (same seed)
    initial = model.get_weights()
    model.load_weights(os.path.join(run, "final.weights.h5"))
    assert any(not np.array_equal(a, b) for a, b in zip(initial, model.get_weights()))
    x, y = data.load_arrays("cifar10", "test", cifar_dir)
    logits = model.predict(data.normalize(x, data.info("cifar10")), verbose=0)
    assert m["test_top1"] == pytest.approx(100 * np.mean(np.argmax(logits, 1) == y), abs=1e-3)


@pytest.mark.parametrize("strategy", ["default", "mirrored", "multi_worker"])
def test_cli_strategy_decides_synchronized_batchnorm(strategy):
    """--strategy mirrored|multi_worker builds every BatchNorm synchronized (statistics
    over the global batch, as one device would compute them), the default none."""
    config = common.config(cifar.build_parser().parse_args(["--strategy", strategy]))
    model = experiment.build_model(config, 10, (8, 8, 3))
    bns = [l for l in model.layers if isinstance(l, tf.keras.layers.BatchNormalization)]
    assert len(bns) == 20
    assert [l.synchronized for l in bns] == [strategy != "default"] * len(bns)


def test_cli_optimizer_is_pytorch_sgd_with_coupled_weight_decay():
    """Two steps of the CLI's compiled model, the learning rate changing between them,
    against PyTorch's SGD written out here with numpy:
        b = momentum * b + (dL/dw + wd * w);  w = w - lr * b
    on every trainable weight, BatchNorm's included. Keras' SGD (v = m v - lr g) and an
    L2 term missing from some weights both fail this."""
    config = common.config(
        cifar.build_parser().parse_args(
            ["--weight-decay", "0.01", "--momentum", "0.9", "--lr", "0.1"]
        )
    )
    model = experiment.build_model(config, 10, (8, 8, 3))
    experiment.compile_model(model, config)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 8, 8, 3)).astype(np.float32)
    y = np.arange(6) % 10
    weights = model.trainable_weights
    assert any("gamma" in w.name for w in weights) and any("beta" in w.name for w in weights)

    def plain_gradient():  # dL/dw at the current weights, no decay term
        with tf.GradientTape() as tape:
            loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
                y, model(x, training=True)
            )
        return [g.numpy().astype(np.float64) for g in tape.gradient(loss, weights)]

    buffers = [np.zeros(w.shape) for w in weights]
    for lr in (0.1, 0.03):
        model.optimizer.learning_rate.assign(lr)
        before = [w.numpy().astype(np.float64) for w in weights]
        grads = plain_gradient()
        model.train_on_batch(x, y)
        for i, (w, g) in enumerate(zip(before, grads)):
            buffers[i] = 0.9 * buffers[i] + g + 0.01 * w
            np.testing.assert_allclose(
                weights[i].numpy(),
                w - lr * buffers[i],
                rtol=1e-4,
                atol=1e-6,
                err_msg=weights[i].name,
            )
    for buffer, slot in zip(buffers, model.optimizer.momentums):  # float32 sums of |g| ~ 5
        np.testing.assert_allclose(slot.numpy(), buffer, rtol=1e-4, atol=2e-5)


def spy_on_compiled_model(monkeypatch):
    seen = {}
    original = experiment.compile_model

    def spy(model, config):
        original(model, config)
        seen["model"] = model

    monkeypatch.setattr(experiment, "compile_model", spy)
    return seen


@pytest.mark.slow  # end to end; default-suite guard: docs/testing.md
def test_cli_label_smoothing_adam_zero_padding_and_export_eval_limit(
    cifar_dir, tmp_path, monkeypatch
):
    """--label-smoothing, --optimizer adam and --padding zero reach the compiled model;
    --export-eval-limit 5 evaluates the .tflite on the first 5 test images (the number
    is in metrics.json) while Keras top-1 stays on the whole test set."""
    import larq as lq

    from reste_larq import data, models

    seen = spy_on_compiled_model(monkeypatch)
    assert (
        run_cli(
            "--data-dir",
            cifar_dir,
            "--results-dir",
            tmp_path,
            "--name",
            "run",
            "--label-smoothing",
            "0.2",
            "--optimizer",
            "adam",
            "--padding",
            "zero",
            *QUICK,
            "--export-eval-limit",
            "5",
        )
        == 0
    )
    model = seen["model"]
    assert isinstance(model.optimizer, tf.keras.optimizers.Adam)
    assert model.optimizer.learning_rate.numpy() == pytest.approx(1e-3)  # Adam's default lr
    binary = [
        l
        for l in model.layers
        if isinstance(l, lq.layers.QuantConv2D) and l.input_quantizer is not None
    ]
    assert len(binary) == 18 and all(l.pad_values == 0.0 for l in binary)
    # the compiled loss is cross-entropy against (1 - 0.2) one_hot + 0.2 / K
    logits = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)
    labels = np.array([0, 3, 9, 3])
    target = np.full((4, 10), 0.2 / 10)
    target[np.arange(4), labels] += 0.8
    log_softmax = logits - np.log(np.sum(np.exp(logits), axis=1, keepdims=True))
    expected = np.mean(-np.sum(target * log_softmax, axis=1))
    assert float(model.loss(labels, logits)) == pytest.approx(expected, rel=1e-5)
    m = read_metrics(str(tmp_path / "run"))
    assert m["args"]["optimizer"] == "adam" and m["args"]["padding"] == "zero"
    assert m["tflite_lce_bconv2d"] == m["binary_convs"] == 18  # zero padding converts too
    assert m["tflite_eval_images"] == 5
    assert m["tflite_test_top1"] in {100.0 * k / 5 for k in range(6)}
    # Keras on the whole 16-image test set, checked against the saved weights
    saved = models.build("resnet20_1w1a", padding="zero")
    saved.load_weights(os.path.join(tmp_path, "run", "final.weights.h5"))
    images, labels = data.load_arrays("cifar10", "test", cifar_dir, download=False)
    logits = saved(data.normalize(images, data.info("cifar10")), training=False).numpy()
    assert m["test_top1"] == pytest.approx(100.0 * np.mean(logits.argmax(-1) == labels), abs=1e-3)


def test_only_the_projects_errors_become_one_line(tmp_path):
    """A ValueError from TensorFlow (or any bug) keeps its traceback; ours are one line."""
    from reste_larq.errors import ConfigError

    def tensorflow_fails(args, train=True):
        raise ValueError("Shapes (None, 3) and (None, 10) are incompatible")

    def ours_fails(args, train=True):
        raise ConfigError("unknown thing 'x'; choose one of a, b")

    argv = ["--results-dir", str(tmp_path), "--verbose", "0"]
    with pytest.raises(ValueError, match="incompatible"):
        common.main(cifar.build_parser(), tensorflow_fails, argv)
    assert common.main(cifar.build_parser(), ours_fails, argv) == 2


def test_help_is_grouped_and_named_as_run(capsys):
    with pytest.raises(SystemExit):
        cifar.main(["--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m train.cifar")
    for group in (
        "data:",
        "model and estimator:",
        "optimization and schedules:",
        "run state:",
        "export:",
        "distribution:",
    ):
        assert f"\n{group}\n" in text, group


@pytest.mark.parametrize("kind", ["corrupt archive", "missing test_batch", "label out of range"])
def test_damaged_data_is_a_one_line_error(tmp_path, capsys, kind):
    from tests.test_data import bad_cifar

    blamed, message = bad_cifar(kind, str(tmp_path / "data"))
    code = run_cli("--data-dir", tmp_path / "data", "--results-dir", tmp_path / "r", *QUICK)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and blamed in err[0] and message in err[0]
    assert not os.path.exists(tmp_path / "r")  # nothing written


@pytest.mark.parametrize(
    "flags",
    [
        # auto on a CPU with AVX-512 BF16 is bfloat16 (the same path as the explicit flag)
        pytest.param(["--mixed-precision", "auto"], id="auto-on-a-bf16-cpu"),
        # float16 is a GPU setting (slow on a CPU): in the slow suite
        pytest.param(["--mixed-precision", "float16"], id="float16", marks=pytest.mark.slow),
        # XLA compiles the whole step (40 s here): slow, like float16
        pytest.param(["--jit-compile"], id="jit", marks=pytest.mark.slow),
    ],
)
def test_speed_flags_train_and_convert_the_same(cifar_dir, tmp_path, monkeypatch, flags):
    """A step under the flag is finite; the export is unchanged: all 18 binary convs are
    LceBconv2d, and the .tflite computes what the float32 Keras model computes."""
    from reste_larq import data, export
    from reste_larq.config import CPU_BF16_ENV

    if "auto" in flags:
        monkeypatch.setenv(CPU_BF16_ENV, "1")
    seen = spy_on_compiled_model(monkeypatch)
    assert (
        run_cli("--data-dir", cifar_dir, "--results-dir", tmp_path, "--name", "run", *QUICK, *flags)
        == 0
    )
    run = str(tmp_path / "run")
    m = read_metrics(run)
    assert np.isfinite(float(history(run)[0]["loss"]))
    assert m["tflite_lce_bconv2d"] == m["binary_convs"] == 18
    model = seen["model"]
    if "--jit-compile" in flags:
        assert model._jit_compile
    else:
        chosen = {"auto": "bfloat16", "float16": "float16"}[flags[1]]
        assert read_args(run)["mixed_precision"] == chosen  # what auto chose, for --resume
        policy = {"bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}[chosen]
        assert model.layers[1].dtype_policy.name == policy
        assert model.output.dtype == tf.float32
        if flags[1] == "float16":
            assert isinstance(model.optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
    twin = export.float32_twin(model) if export.is_mixed_precision(model) else model
    assert not export.is_mixed_precision(twin)
    x, _ = data.load_arrays("cifar10", "test", cifar_dir)
    x = data.normalize(x, data.info("cifar10")).numpy()
    with open(os.path.join(run, "model.tflite"), "rb") as f:
        tflite = export.predict_tflite(f.read(), x)
    keras = twin(x, training=False).numpy()
    assert (tflite.argmax(1) == keras.argmax(1)).mean() >= 15 / 16


def test_cli_step_schedule_and_evaluate_reports_the_runs_own_mu(cifar_dir, tmp_path, capsys):
    """--lr-schedule step reaches the optimizer; --evaluate reports the run's own BNN++ mu
    schedule (from its args.json), at the run's last epoch."""
    assert (
        run_cli(
            "--data-dir",
            cifar_dir,
            "--results-dir",
            tmp_path,
            "--name",
            "run",
            *QUICK,
            "--epochs",
            "3",
            "--no-export",
            "--lr-schedule",
            "step",
            "--lr-steps",
            "1",
            "2",
            "--lr-gamma",
            "0.5",
            "--quantizer",
            "bnnpp",
            "--mu-start",
            "3",
            "--mu-end",
            "7",
        )
        == 0
    )
    assert [float(r["lr"]) for r in history(str(tmp_path / "run"))] == pytest.approx(
        [0.1, 0.05, 0.025]
    )
    assert read_metrics(str(tmp_path / "run"))["args"]["lr_schedule"] == "step"
    # mu at the last epoch (2 of 3): 3 + 4 (1 - cos(pi/2 * 2/3))
    expected = 3 + 4 * (1 - np.cos(np.pi / 3))
    assert read_metrics(str(tmp_path / "run"))["mu_final"] == pytest.approx(expected)
    capsys.readouterr()
    assert (
        run_cli(
            "--evaluate", tmp_path / "run", "--data-dir", cifar_dir, "--no-download", "--no-export"
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["mu_final"] == pytest.approx(expected)


@pytest.mark.slow  # end to end; default-suite guard: docs/testing.md
def test_distillation_from_a_teacher_run(cifar_dir, tmp_path, monkeypatch, capsys):
    """--teacher: the student trains against a finished float run, exports alone, and
    --evaluate finds it (a killed distilled run resumes: slow test below)."""
    base = ["--data-dir", cifar_dir, "--results-dir", tmp_path, *QUICK]
    assert run_cli(*base, "--name", "teacher", "--quantizer", "float", "--no-export") == 0
    teacher = str(tmp_path / "teacher")
    distill = [
        *base,
        "--teacher",
        teacher,
        "--distill-weight",
        "0.7",
        "--distill-temperature",
        "2",
    ]
    assert run_cli(*distill, "--name", "student") == 0
    m = check_outputs(str(tmp_path / "student"))  # 18 LceBconv2d, TFLite = Keras
    assert m["teacher"] == teacher
    assert m["teacher_test_top1"] == read_metrics(teacher)["test_top1"]
    assert m["tflite_bytes"] < 100_000  # the student alone (the float teacher is ~1 MB)
    assert {"kd_loss", "loss"} <= set(history(str(tmp_path / "student"))[0])
    capsys.readouterr()
    assert (
        run_cli(
            "--evaluate",
            tmp_path / "student",
            "--data-dir",
            cifar_dir,
            "--no-download",
            "--no-export",
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["test_top1"] == m["test_top1"]


@pytest.mark.slow  # two more distilled runs (the resume machinery: test_resume_after_crash...)
def test_killed_distilled_run_resumes_to_the_same_end(cifar_dir, tmp_path, monkeypatch):
    base = ["--data-dir", cifar_dir, "--results-dir", tmp_path, *QUICK, "--no-export"]
    assert run_cli(*base, "--name", "teacher", "--quantizer", "float") == 0
    distill = [*base, "--teacher", tmp_path / "teacher", "--epochs", "2"]
    assert run_cli(*distill, "--name", "student") == 0
    run_killed_at_epoch(1, monkeypatch, *distill, "--name", "crashed")
    assert run_cli(*distill, "--name", "crashed", "--resume") == 0
    assert history(str(tmp_path / "crashed")) == history(str(tmp_path / "student"))
    assert (
        read_metrics(str(tmp_path / "crashed"))["weights_sha256"]
        == read_metrics(str(tmp_path / "student"))["weights_sha256"]
    )


def test_bad_teacher_is_a_one_line_error(cifar_dir, tmp_path, capsys):
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "args.json").write_text(json.dumps({"dataset": "cifar10"}))
    other = tmp_path / "other"
    other.mkdir()
    (other / "args.json").write_text(json.dumps({"dataset": "cifar100"}))
    (other / "final.weights.h5").write_bytes(b"")
    # Same classes and image shape, yet another dataset or other normalization.
    fashion = tmp_path / "fashion"
    fashion.mkdir()
    (fashion / "args.json").write_text(json.dumps({"dataset": "fashion_mnist"}))
    (fashion / "final.weights.h5").write_bytes(b"")
    wrn = tmp_path / "wrn"
    wrn.mkdir()
    (wrn / "args.json").write_text(json.dumps({"dataset": "cifar10", "mean_std": "wrn"}))
    (wrn / "final.weights.h5").write_bytes(b"")
    for teacher, message, more in (
        (not_a_run, "is not a run folder", []),
        (unfinished, "has no final.weights.h5", []),
        (other, "was trained on cifar100; this run trains on cifar10", []),
        (fashion, "was trained on fashion_mnist; this run trains on mnist", ["--dataset", "mnist"]),
        (wrn, "trained with --mean-std wrn and this run normalizes with --mean-std dataset", []),
    ):
        code = run_cli(
            "--data-dir",
            cifar_dir,
            "--results-dir",
            tmp_path / "r",
            *QUICK,
            "--teacher",
            teacher,
            *more,
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
        assert not os.path.exists(tmp_path / "r")


def test_wrn_takes_its_own_recipe_for_unset_flags():
    """--model wrn20_10_1bit: the 1-bit WRN code's recipe (szagoruyko/binary-wide-resnet
    main.py) for every flag the command line leaves unset; given flags win; other
    models keep the ReSTE defaults."""
    parser = cifar.build_parser()
    args = common.parse(parser, ["--model", "wrn20_10_1bit"])
    assert (args.dataset, args.epochs, args.batch_size, args.weight_decay) == (
        "cifar100",
        256,
        128,
        5e-4,
    )
    assert (args.lr_schedule, args.sgdr_period, args.sgdr_mult, args.lr_min) == (
        "sgdr",
        2,
        2.0,
        1e-4,
    )
    assert (args.mean_std, args.crop_padding, args.momentum) == ("wrn", "reflect", 0.9)
    schedule = experiment.learning_rate_schedule(common.config(args))
    assert cb.sgdr_restarts(2, 2.0, 256) == [2, 4, 8, 16, 32, 64, 128]
    assert schedule.lr_at(0) == pytest.approx(0.1) and schedule.lr_at(2) == pytest.approx(0.1)
    mine = common.parse(parser, ["--model", "wrn20_10_1bit", "--epochs", "3", "-b", "64"])
    assert (mine.epochs, mine.batch_size, mine.dataset) == (3, 64, "cifar100")
    plain = common.parse(parser, ["--model", "resnet20_1w1a"])
    assert (plain.dataset, plain.epochs, plain.mean_std) == ("cifar10", 1000, "dataset")
    assert "wrn20_10_1bit defaults to its own recipe" in parser.format_help()


@pytest.mark.slow  # the block's conversion is tested per model in test_models.py
def test_cli_react_block_trains_and_converts(cifar_dir, tmp_path):
    argv = ["--data-dir", cifar_dir, "--results-dir", tmp_path, *QUICK, "--name", "react"]
    assert run_cli(*argv, "--block", "react") == 0
    m = check_outputs(str(tmp_path / "react"))  # 18 LceBconv2d, TFLite = Keras top-1
    assert m["args"]["block"] == "react"


@pytest.mark.slow  # two estimators x (straight, crashed, resumed, evaluated): ~2 minutes
@pytest.mark.parametrize("quantizer", ["recu", "biper"])
def test_recu_and_biper_resume_exactly_and_evaluate(
    cifar_dir, tmp_path, monkeypatch, capsys, quantizer
):
    """ReCU's tau follows the epochs (logged as `tau`), BiPer adds its regularizer to
    the loss; a run killed at epoch 1 and resumed ends with the weights of a straight
    one, and --evaluate reproduces its metrics."""
    common = [
        "--data-dir", cifar_dir, "--results-dir", tmp_path, *QUICK, "--epochs", "2",
        "--no-export", "--quantizer", quantizer,
    ]  # fmt: skip
    assert run_cli(*common, "--name", "straight") == 0
    run_killed_at_epoch(1, monkeypatch, *common, "--name", "crashed")
    assert run_cli(*common, "--name", "crashed", "--resume") == 0
    straight, resumed = history(str(tmp_path / "straight")), history(str(tmp_path / "crashed"))
    m = read_metrics(str(tmp_path / "straight"))
    assert m["weights_sha256"] == read_metrics(str(tmp_path / "crashed"))["weights_sha256"]
    # Every logged value as written, except BiPer's logged losses, which are not
    # bit-reproducible between two fresh runs in one process: CI saw 3.573751449584961
    # vs 3.5737509727478027 (loss, epoch 0, before any resume) and 4.894948482513428 vs
    # 4.8949480056762695 (val_loss, epoch 1), each with bit-identical weights (the float
    # sum of its regularizer terms; a sum's gradient does not depend on it).
    loose = {"loss", "val_loss"} if quantizer == "biper" else set()
    assert [{k: v for k, v in r.items() if k not in loose} for r in resumed] == [
        {k: v for k, v in r.items() if k not in loose} for r in straight
    ]
    for row, want in zip(resumed, straight):
        for key in loose:
            assert float(row[key]) == pytest.approx(float(want[key]), rel=1e-6), (key, row)
    if quantizer == "recu":
        taus = [float(r["tau"]) for r in straight]
        assert taus == pytest.approx([Q.recu_tau_at(0, 2), Q.recu_tau_at(1, 2)])
        assert m["tau_final"] == pytest.approx(Q.recu_tau_at(1, 2))
    capsys.readouterr()
    argv = ["--evaluate", tmp_path / "straight", "--data-dir", cifar_dir, "--results-dir", tmp_path]
    assert run_cli(*argv, "--verbose", "0", "--no-download", "--no-export") == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["test_top1"], printed["test_top5"]) == (m["test_top1"], m["test_top5"])
