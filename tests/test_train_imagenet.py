"""`python -m train.imagenet`: clear error without data; end to end on mock data (slow)."""

import csv
import json
import os
import signal
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

from train import imagenet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_missing_imagenet_is_a_one_line_error(tmp_path, capsys):
    code = imagenet.main(
        ["--data-dir", str(tmp_path), "--no-download", "--results-dir", str(tmp_path / "r")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: imagenet2012") and "manual download" in err[0]
    assert not os.path.exists(tmp_path / "r")


def test_help_names_the_module_and_lists_imagenet_models(capsys):
    with pytest.raises(SystemExit):
        imagenet.main(["--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m train.imagenet")
    assert "birealnet18" in text and "resnet20_1w1a" not in text


@pytest.mark.parametrize(
    "argv, quantizer, lr",
    [
        ([], "reste", 0.1),
        (["--model", "birealnet18"], "bireal", 0.1),
        (["--model", "birealnet18", "--optimizer", "adam"], "bireal", 1e-3),
        (["--quantizer", "ReSTE", "--lr", "0.05"], "reste", 0.05),
    ],
)
def test_defaults_that_depend_on_other_flags(argv, quantizer, lr):
    from train.common import config

    args = config(imagenet.build_parser().parse_args(argv))
    assert (args.quantizer, args.lr) == (quantizer, lr)


@pytest.mark.slow
def test_imagenet_end_to_end_on_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=4):
        code = imagenet.main(
            [
                "--model",
                "birealnet18",
                "--epochs",
                "1",
                "-b",
                "2",
                "--batch-size-test",
                "2",
                "--train-limit",
                "4",
                "--test-limit",
                "2",
                "--results-dir",
                str(tmp_path),
                "--name",
                "mock",
                "--verbose",
                "0",
                "--no-download",
            ]
        )
    assert code == 0
    with open(tmp_path / "mock" / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["tflite_lce_bconv2d"] == metrics["binary_convs"] == 16
    assert metrics["tflite_eval_images"] == 2


MOCK_RUN = [
    "--model",
    "birealnet18",
    "--epochs",
    "3",
    "-b",
    "2",
    "--batch-size-test",
    "2",
    "--train-limit",
    "4",
    "--test-limit",
    "2",
    "--verbose",
    "0",
    "--no-download",
    "--no-export",
    "--shuffle-buffer",
    "3",
]


@pytest.mark.slow  # three subprocesses: two minutes
def test_imagenet_resume_after_sigkill_ends_where_uninterrupted_run_ends(tmp_path):
    """As the CIFAR test: a run killed at the start of epoch 3 and resumed sees the
    batches an uninterrupted run sees (order and crops are functions of seed, epoch),
    so it ends with the same weights. --deterministic: without one inter-op thread the
    stem's float conv gradient can come out an ulp apart at 224 px, and a binary
    network turns that into another run (benchmarks/determinism.py)."""
    common = [*MOCK_RUN, "--results-dir", str(tmp_path), "--deterministic"]
    env = {**os.environ, "KILL_AT_CLI": "imagenet", "KILL_AT_MOCK_EXAMPLES": "6"}

    def run(point, *argv):
        return subprocess.run(
            [sys.executable, "-m", "tests.kill_at", point, *common, *argv],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    straight = run("nowhere", "--name", "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = run("third_epoch_begins", "--name", "crashed")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "crashed" / "metrics.json").exists()
    resumed = run("nowhere", "--name", "crashed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    def losses(name):
        with open(tmp_path / name / "history.csv") as f:
            return [float(row["loss"]) for row in csv.DictReader(f)]

    assert len(losses("straight")) == len(losses("crashed")) == 3
    assert losses("straight") == losses("crashed")
    m1 = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "crashed" / "metrics.json").read_text())
    assert m1["weights_sha256"] == m2["weights_sha256"]
    assert m1["test_top1"] == m2["test_top1"] and m2["deterministic"] is True
