"""`python -m train.imagenet`: clear error without data; end to end on mock data (slow)."""

import json
import os

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
    from train.common import resolve_args

    args = resolve_args(imagenet.build_parser().parse_args(argv))
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
