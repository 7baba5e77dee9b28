"""The package as a user imports it: one import exposes the library; larq-zoo is not
needed at run time."""

import os
import re
import subprocess
import sys

import pytest
import tensorflow as tf

from tests.test_train import ROOT


def test_library_errors_are_value_errors_naming_the_choices():
    import pytest

    import reste_larq

    with pytest.raises(ValueError, match="choose one of"):  # ConfigError is a ValueError
        reste_larq.models.build("resnet21")
    with pytest.raises(reste_larq.ConfigError, match="choose one of sgd, adam"):
        reste_larq.training.make_optimizer("rmsprop", 0.1)


def fresh_python(code, **env):
    """Run `code` in a new interpreter; `env` entries set (None: removed)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("TF_USE_LEGACY_KERAS",)}
    for key, value in env.items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = value
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=environ,
    )


def test_one_import_arranges_keras_2_and_exposes_the_library_without_larq_zoo():
    """In a fresh interpreter, without the user exporting anything: `import reste_larq`
    makes tf.keras Keras 2, registers the quantizer names, exposes the library, and
    needs no larq-zoo at run time."""
    result = fresh_python(
        """
import sys
import reste_larq
import larq as lq
import tensorflow as tf
assert reste_larq._tensorflow.is_keras2(tf.keras), tf.keras.Model.__module__
layer = lq.layers.QuantConv2D(4, 3, input_quantizer="reste", kernel_quantizer="reste")
assert isinstance(layer, tf.keras.layers.Layer)
model = reste_larq.models.build("resnet20_1w1a", input_shape=(8, 8, 3))
assert reste_larq.export.count_binary_convs(model) == 18
assert callable(reste_larq.data.load_arrays) and reste_larq.callbacks.EstimatorSchedule
assert reste_larq.training.TorchSGD and reste_larq.ConfigError
import train.cifar, train.imagenet
assert "larq_zoo" not in sys.modules, "larq_zoo imported at run time"
import os
if tf.__version__.startswith("2.19."):  # XLA's faster CPU runtime here (_tensorflow.py)
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_use_thunk_runtime=false", os.environ
print("ok")
""",
        TF_CPP_MIN_LOG_LEVEL=None,
        XLA_FLAGS=None,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
    # ... and quietly: TensorFlow's import-time C++ lines are dropped.
    cpp_lines = [l for l in result.stderr.splitlines() if CPP_LOG_LINE.match(l)]
    assert cpp_lines == [], cpp_lines


def test_the_users_xla_cpu_runtime_choice_is_kept(monkeypatch):
    from reste_larq import _tensorflow

    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_thunk_runtime=true --xla_dump_to=/tmp/x")
    _tensorflow._choose_xla_cpu_runtime()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_use_thunk_runtime=true --xla_dump_to=/tmp/x"
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    _tensorflow._choose_xla_cpu_runtime()
    added = " --xla_cpu_use_thunk_runtime=false" if tf.__version__.startswith("2.19.") else ""
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x" + added


CPP_LOG_LINE = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] )")


@pytest.mark.skipif(
    tuple(int(v) for v in tf.__version__.split(".")[:2]) < (2, 16),
    reason="TensorFlow <= 2.15's tf.keras is always Keras 2",
)
def test_tensorflow_imported_first_with_keras_3_stops_with_one_line():
    result = fresh_python("import tensorflow as tf\nimport reste_larq\n", TF_CPP_MIN_LOG_LEVEL="3")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("reste_larq._tensorflow.KerasVersionError: reste_larq needs Keras 2")
    assert "import reste_larq before tensorflow" in last and "TF_USE_LEGACY_KERAS=1" in last


@pytest.mark.parametrize(
    "line, level, kept",
    [
        ("W0000 00:00:1796173230.454659    2831 computation_placer.cc:177] placer\n", 2, False),
        (
            "I0000 00:00:1796173381.356394    3130 device_compiler.h:188] Compiled cluster\n",
            2,
            False,
        ),
        ("E0000 00:00:1796173381.356394    3130 some_op.cc:18] a real error\n", 2, True),
        ("E0000 00:00:1796173381.356394    3130 some_op.cc:18] a real error\n", 3, False),
        (
            "E0000 00:00:1796173361.2 3123 cuda_dnn.cc:8579] Unable to register cuDNN factory\n",
            2,
            False,
        ),
        (
            "2026-12-02 01:02:46.091369: E external/cuda.cc:51] failed call to cuInit: x\n",
            2,
            False,
        ),
        (
            "2026-12-02 01:02:46.091369: W tensorflow/core/framework/op_kernel.cc:1] warn\n",
            2,
            False,
        ),
        ("2026-12-02 01:02:46.091369: W tensorflow/core/framework/op_kernel.cc:1] warn\n", 1, True),
        (
            "I0000 00:00:1796173381.356394    3130 device_compiler.h:188] Compiled cluster\n",
            0,
            True,
        ),
        (
            "WARNING: All log messages before absl::InitializeLog() is called are written\n",
            2,
            False,
        ),
        ("Traceback (most recent call last):\n", 3, True),
        ("Epoch 1/3\n", 2, True),
    ],
)
def test_cpp_log_filter_keeps_what_the_level_asks_for(line, level, kept):
    from reste_larq import _tensorflow

    assert _tensorflow._keep(line.encode(), level) is kept


def test_cli_filter_drops_cpp_lines_and_keeps_python_stderr():
    code = r"""
import os, sys
from reste_larq import _tensorflow
_tensorflow.filter_cpp_logs()
os.write(2, b"I0000 00:00:1796173381.356394    3130 device_compiler.h:188] Compiled cluster\n")
os.write(2, b"E0000 00:00:1796173381.356394    3130 some_op.cc:18] a real error\n")
os.write(2, b"a C++ line that is no log line\n")
print("from python", file=sys.stderr)
print("out")
"""
    result = fresh_python(code, TF_CPP_MIN_LOG_LEVEL=None)
    assert result.returncode == 0 and result.stdout == "out\n", result.stderr
    lines = result.stderr.splitlines()
    assert "from python" in lines and "a C++ line that is no log line" in lines
    assert any("a real error" in l for l in lines)
    assert not any("Compiled cluster" in l for l in lines), lines
    # TF_CPP_MIN_LOG_LEVEL=0 asks for everything.
    shown = fresh_python(code, TF_CPP_MIN_LOG_LEVEL="0")
    assert any("Compiled cluster" in l for l in shown.stderr.splitlines()), shown.stderr
