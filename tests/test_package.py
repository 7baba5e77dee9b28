"""The package as a user imports it: one import exposes the library; larq-zoo is not
needed at run time."""

import subprocess
import sys

from tests.test_train import ROOT


def test_one_import_exposes_the_library_without_larq_zoo():
    code = """
import sys
import reste_larq
model = reste_larq.models.build("resnet20_1w1a", input_shape=(8, 8, 3))
assert reste_larq.export.count_binary_convs(model) == 18
assert callable(reste_larq.data.load_arrays) and reste_larq.callbacks.EstimatorSchedule
assert reste_larq.training.TorchSGD and reste_larq.ConfigError
import train.cifar, train.imagenet
assert "larq_zoo" not in sys.modules, "larq_zoo imported at run time"
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_library_errors_are_value_errors_naming_the_choices():
    import pytest

    import reste_larq

    with pytest.raises(ValueError, match="choose one of"):  # ConfigError is a ValueError
        reste_larq.models.build("resnet21")
    with pytest.raises(reste_larq.ConfigError, match="choose one of sgd, adam"):
        reste_larq.training.make_optimizer("rmsprop", 0.1)
