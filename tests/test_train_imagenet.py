"""`python -m train.imagenet`: clear error without data; end to end on mock data (slow)."""

import csv
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from train import imagenet


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


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="known bug, found 2026-12-02 running the whole slow suite: two runs "
    "with the same seed on TFDS mock data differ from epoch 2 or 3, on TF 2.15.1 and 2.19.1 "
    "alike; strict, so a fix makes this test fail until the mark is removed",
)
def test_imagenet_resume_after_crash_ends_where_uninterrupted_run_ends(tmp_path, monkeypatch):
    """As the CIFAR test: a run killed at the start of epoch 3 and resumed sees the
    batches an uninterrupted run sees (order and crops are functions of seed, epoch)."""
    from reste_larq import callbacks as cb
    from tests.test_train import Killed

    common = [*MOCK_RUN, "--results-dir", str(tmp_path)]
    with tfds.testing.mock_data(num_examples=6):
        assert imagenet.main([*common, "--name", "straight"]) == 0
        original = cb.LearningRateSchedule.on_epoch_begin

        def crash(self, epoch, logs=None):
            if epoch == 2:
                raise Killed("simulated kill")
            original(self, epoch, logs)

        monkeypatch.setattr(cb.LearningRateSchedule, "on_epoch_begin", crash)
        with pytest.raises(Killed):
            imagenet.main([*common, "--name", "crashed"])
        monkeypatch.setattr(cb.LearningRateSchedule, "on_epoch_begin", original)
        assert imagenet.main([*common, "--name", "crashed", "--resume"]) == 0

    def losses(name):
        with open(tmp_path / name / "history.csv") as f:
            return [float(row["loss"]) for row in csv.DictReader(f)]

    straight, resumed = losses("straight"), losses("crashed")
    assert len(straight) == len(resumed) == 3
    np.testing.assert_allclose(straight, resumed, rtol=1e-4)
    m1 = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "crashed" / "metrics.json").read_text())
    assert m1["test_top1"] == m2["test_top1"]
