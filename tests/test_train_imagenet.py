"""`python -m train.imagenet`: clear error without data; end to end on mock data (slow)."""

import json
import os

import pytest
import tensorflow_datasets as tfds

from train import imagenet


def test_missing_imagenet_is_a_one_line_error(tmp_path, capsys):
    code = imagenet.main(["--data-dir", str(tmp_path), "--no-download", "--results-dir",
                          str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: imagenet2012") and "manual download" in err[0]
    assert not os.path.exists(tmp_path / "r")


def test_imagenet_defaults_are_the_reference_recipe():
    from train.common import resolve_args

    args = resolve_args(imagenet.build_parser().parse_args([]))
    assert (args.model, args.epochs, args.batch_size, args.batch_size_test, args.lr,
            args.weight_decay, args.o_end) == ("resnet18_1w1a_imagenet", 250, 750, 256, 0.1, 1e-4, 3.0)


@pytest.mark.parametrize("argv, quantizer, lr", [
    ([], "reste", 0.1),
    (["--model", "birealnet18"], "bireal", 0.1),
    (["--model", "birealnet18", "--optimizer", "adam"], "bireal", 1e-3),
    (["--quantizer", "ReSTE", "--lr", "0.05"], "reste", 0.05),
])
def test_defaults_that_depend_on_other_flags(argv, quantizer, lr):
    from train.common import resolve_args

    args = resolve_args(imagenet.build_parser().parse_args(argv))
    assert (args.quantizer, args.lr) == (quantizer, lr)


@pytest.mark.slow
def test_imagenet_end_to_end_on_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=4):
        code = imagenet.main(["--model", "birealnet18", "--epochs", "1", "-b", "2",
                              "--batch-size-test", "2", "--train-limit", "4", "--test-limit", "2",
                              "--results-dir", str(tmp_path), "--name", "mock", "--verbose", "0",
                              "--no-download"])
    assert code == 0
    with open(tmp_path / "mock" / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["tflite_lce_bconv2d"] == metrics["binary_convs"] == 16
