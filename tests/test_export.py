"""Packed 1-bit checkpoints: exact restore, the WRN file size, bad files, the CLI."""

import json
import os

import larq as lq
import numpy as np
import pytest

from reste_larq import export, models
from reste_larq.errors import ConfigError
from tests.test_models import with_trained_batchnorm


def inference(model, seed=0):
    x = np.random.default_rng(seed).standard_normal((2, *model.input_shape[1:]))
    return model(x.astype(np.float32), training=False).numpy()


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("resnet20_1w1a", {}),
        ("resnet20_1w1a", {"a32": True}),
        ("resnet20_1w1a", {"quantizer": "bnnpp", "input_shape": (8, 8, 3)}),
        ("vgg_small_1w1a", {"input_shape": (16, 16, 3)}),
    ],
)
def test_packed_restores_outputs_exactly(name, kwargs, tmp_path):
    model = with_trained_batchnorm(models.build(name, **kwargs))
    path = str(tmp_path / "m.packed.npz")
    stats = export.save_packed(model, path)
    n_binary = sum(1 for l in model.layers if isinstance(l, lq.layers.QuantConv2D))
    assert stats["binary_kernels"] == n_binary and stats["unpacked_binary_kernels"] == 0
    expected = inference(model)
    # from the stored config, and into a freshly built model of the same architecture
    for restored in (
        export.load_packed(path),
        export.load_packed(path, models.build(name, **kwargs)),
    ):
        np.testing.assert_array_equal(inference(restored), expected)
        for a, b in zip(model.layers, restored.layers):
            if isinstance(a, lq.layers.QuantConv2D):  # the deployed kernels, bit for bit
                np.testing.assert_array_equal(
                    a.kernel_quantizer(a.kernel.latent_variable),
                    b.kernel_quantizer(b.kernel.latent_variable),
                )
            elif a.weights:
                for wa, wb in zip(a.weights, b.weights):
                    np.testing.assert_array_equal(wa.numpy(), wb.numpy())


@pytest.mark.parametrize("width", [1, pytest.param(10, marks=pytest.mark.slow)])
def test_wrn_packs_exactly_and_wrn20_10_in_at_most_4_mb(tmp_path, width):
    """McDonnell's binarizer (wrn_sign, its own scale) packs and restores exactly; at
    width 10 (26.8M weights) the file is the paper's size (3.5 MB)."""
    model = with_trained_batchnorm(models.build("wrn20_10_1bit", num_classes=100, width=width))
    path = str(tmp_path / "wrn.packed.npz")
    stats = export.save_packed(model, path)
    assert stats["binary_kernels"] == 18 and stats["unpacked_binary_kernels"] == 0
    if width == 10:
        assert os.path.getsize(path) <= 4e6
    np.testing.assert_array_equal(inference(export.load_packed(path)), inference(model))


def test_bad_packed_files(tmp_path):
    not_npz = tmp_path / "x.npz"
    not_npz.write_bytes(b"hello")
    with pytest.raises(ConfigError, match="not a packed checkpoint"):
        export.load_packed(str(not_npz))
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(3))
    with pytest.raises(ConfigError, match="not a reste_larq.packed.v1 file"):
        export.load_packed(str(other))
    path = str(tmp_path / "r20.npz")
    export.save_packed(models.build("resnet20_1w1a", input_shape=(8, 8, 3)), path)
    with pytest.raises(ConfigError, match="another architecture"):
        export.load_packed(path, models.build("vgg_small_1w1a", input_shape=(8, 8, 3)))


@pytest.mark.slow  # end to end; default-suite guard: docs/testing.md
def test_cli_export_packed_and_evaluate_it(tmp_path, capsys):
    from tests.test_data import write_cifar10
    from tests.test_train import QUICK, read_metrics, run_cli

    write_cifar10(str(tmp_path / "data"), n_per_batch=16)
    assert (
        run_cli(
            "--data-dir",
            tmp_path / "data",
            "--results-dir",
            tmp_path,
            "--name",
            "run",
            *QUICK,
            "--no-export",
            "--export-packed",
        )
        == 0
    )
    m = read_metrics(str(tmp_path / "run"))
    packed = tmp_path / "run" / "model.packed.npz"
    assert m["packed_bytes"] == os.path.getsize(packed) and m["packed_binary_kernels"] == 18
    capsys.readouterr()
    assert (
        run_cli(
            "--evaluate", packed, "--data-dir", tmp_path / "data", "--no-download", "--no-export"
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["test_top1"] == m["test_top1"] and printed["test_top5"] == m["test_top5"]


@pytest.fixture(scope="module")
def tiny_tflite():
    """(model, its flatbuffer): one conversion for the tests of the evaluation loop."""
    model = tiny_binary_model()
    return model, export.convert(model)


def test_tflite_predictions_show_progress_with_images_per_second(capsys, tiny_tflite):
    import tensorflow as tf

    model, flatbuffer = tiny_tflite
    images = np.random.default_rng(0).standard_normal((10, 6, 6, 2)).astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices((images, np.arange(10) % 3)).batch(4)
    capsys.readouterr()
    logits, labels = export.tflite_predictions(flatbuffer, dataset, progress=True)
    shown = capsys.readouterr()
    assert "10/10" in shown.err and "images/s:" in shown.err, shown  # last batch: 2 images
    assert shown.out == ""  # stdout is the caller's (the CLI prints its metrics JSON there)
    np.testing.assert_allclose(logits, model.predict(images, verbose=0), atol=1e-4)
    assert list(labels) == list(np.arange(10) % 3)
    export.tflite_predictions(flatbuffer, dataset)  # progress is opt-in
    assert capsys.readouterr() == ("", "")


def test_tflite_predictions_use_one_interpreter_thread_unless_told(monkeypatch, tiny_tflite):
    """One thread by default: as fast idle, ~4x faster on a busy machine (docs/results.md)."""
    import tensorflow as tf

    _, flatbuffer = tiny_tflite
    images = np.zeros((3, 6, 6, 2), np.float32)
    dataset = tf.data.Dataset.from_tensor_slices((images, np.zeros(3))).batch(3)
    asked, real = [], export.interpreter
    monkeypatch.setattr(export, "interpreter", lambda fb, n: asked.append(n) or real(fb, n))
    export.tflite_predictions(flatbuffer, dataset)
    export.tflite_predictions(flatbuffer, dataset, num_threads=2)
    assert asked == [1, 2]


def tiny_binary_model(kernel_quantizer="ste_sign"):
    import tensorflow as tf

    inputs = tf.keras.Input((6, 6, 2), name="image")
    x = lq.layers.QuantConv2D(
        4, 3, input_quantizer="ste_sign", kernel_quantizer=kernel_quantizer, use_bias=False
    )(inputs)
    outputs = tf.keras.layers.Dense(3, name="logits")(tf.keras.layers.Flatten()(x))
    return tf.keras.Model(inputs, outputs)


@pytest.mark.parametrize(
    "name",
    [
        "tiny",
        pytest.param("resnet20_1w1a", marks=pytest.mark.slow),
        pytest.param("birealnet18", marks=pytest.mark.slow),
    ],
)
def test_convert_is_lces_keras_conversion_byte_for_byte(name):
    """export.convert saves one inference signature instead of Keras' SavedModel: the
    flatbuffer must be the one `lce.convert_keras_model` makes."""
    import larq_compute_engine as lce

    model = tiny_binary_model() if name == "tiny" else with_trained_batchnorm(models.build(name))
    assert export.convert(model) == lce.convert_keras_model(model)


def test_a_binary_conv_lce_leaves_float_is_an_error():
    # DoReFa at 1 bit is a 1-bit kernel quantizer (precision 1) that LCE does not read
    # as a sign: the conv would run as a float conv on the device.
    model = tiny_binary_model(lq.quantizers.DoReFa(k_bit=1))
    assert export.count_binary_convs(model) == 1
    with pytest.raises(ConfigError, match="converted 0 of the model's 1 binary convs"):
        export.convert(model)
