"""OnePaddedQuantConv2D: Larq's QuantConv2D with one-padding trained without the padded
copy. Training forward and gradients equal Larq's layer to float rounding for every
stride, kernel and size shape; inference is Larq's layer bit for bit."""

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from reste_larq import layers, models
from reste_larq.quantizers import MeanAbsScaled


def pair(pad_value=1.0, **kwargs):
    """Larq's layer and ours with the same weights, quantizers and arguments."""
    kwargs = dict(padding="same", pad_values=pad_value, use_bias=False, **kwargs)
    quantizers = lambda: dict(  # noqa: E731
        input_quantizer="reste",
        kernel_quantizer=MeanAbsScaled("reste"),
        kernel_constraint="weight_clip",
    )
    return lq.layers.QuantConv2D(**quantizers(), **kwargs), layers.OnePaddedQuantConv2D(
        **quantizers(), **kwargs
    )


def forward_and_gradients(layer, x, training):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=training)
        loss = tf.reduce_sum(y * tf.sin(y))  # a gradient that differs position by position
    return (y, *tape.gradient(loss, [x, layer.kernel]))


CASES = [
    # (input shape, filters, kernel, strides, dilation, pad value)
    ((4, 9, 9, 5), 6, 3, 1, 1, 1.0),
    ((4, 8, 8, 5), 6, 3, 2, 1, 1.0),
    ((3, 7, 7, 2), 4, 3, 2, 1, 1.0),
    ((2, 6, 10, 3), 5, (5, 3), 1, 1, 1.0),
    ((2, 9, 9, 3), 4, 3, 1, 2, 1.0),
    ((2, 8, 8, 3), 4, 1, 2, 1, 1.0),  # no padding at all
    ((2, 2, 2, 3), 4, 5, 1, 1, 1.0),  # the kernel is larger than the image
    ((3, 8, 8, 4), 4, 3, 1, 1, -1.0),
]


@pytest.mark.parametrize("shape, filters, kernel, strides, dilation, value", CASES)
def test_training_equals_larqs_padded_copy_and_inference_is_larqs(
    shape, filters, kernel, strides, dilation, value
):
    tf.keras.utils.set_random_seed(1)
    kwargs = dict(filters=filters, kernel_size=kernel, strides=strides, dilation_rate=dilation)
    larq_layer, ours = pair(value, **kwargs)
    x = tf.constant(np.random.default_rng(0).standard_normal(shape, np.float32))
    larq_layer.build(x.shape)
    ours.build(x.shape)
    ours.set_weights(larq_layer.get_weights())
    for got, want in zip(
        forward_and_gradients(ours, x, True), forward_and_gradients(larq_layer, x, True)
    ):
        scale = float(tf.reduce_max(tf.abs(want))) or 1.0
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-6 * scale)
    for got, want in zip(
        forward_and_gradients(ours, x, False), forward_and_gradients(larq_layer, x, False)
    ):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_the_border_term_is_what_the_padded_copy_adds():
    """border_taps by brute force: the conv of an all-zero image padded with c."""
    rng = np.random.default_rng(2)
    kernel = rng.standard_normal((3, 3, 4, 5)).astype(np.float32)
    for hw, strides, padding in (
        ((6, 7), (1, 1), ((1, 1), (1, 1))),
        ((8, 8), (2, 2), ((0, 1), (0, 1))),
    ):
        strips, positions, taps, (ho, wo) = layers.border_taps(
            hw, (3, 3), strides, (1, 1), padding, 1.0
        )
        padded = tf.pad(tf.zeros([1, *hw, 4]), [[0, 0], *padding, [0, 0]], constant_values=1.0)
        full = tf.nn.conv2d(padded, kernel, strides, "VALID").numpy().reshape(ho * wo, 5)
        from_taps = taps @ kernel.sum(axis=2).reshape(9, 5)
        np.testing.assert_allclose(full[positions], from_taps, atol=1e-5)
        rest = np.setdiff1d(np.arange(ho * wo), positions)
        np.testing.assert_array_equal(full[rest], 0.0)  # nothing else reads the padding
        assert len(set(positions)) == len(positions) == ho * wo - len(rest)
        assert strips == ((1, 1, 1, 1) if strides == (1, 1) else (0, 1, 0, 1))


def test_decompose_padding_false_is_larqs_layer_bit_for_bit():
    tf.keras.utils.set_random_seed(1)
    larq_layer, ours = pair(filters=4, kernel_size=3)
    ours.decompose_padding = False
    x = tf.constant(np.random.default_rng(0).standard_normal((2, 6, 6, 3), np.float32))
    larq_layer.build(x.shape)
    ours.build(x.shape)
    ours.set_weights(larq_layer.get_weights())
    for got, want in zip(
        forward_and_gradients(ours, x, True), forward_and_gradients(larq_layer, x, True)
    ):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_bfloat16_training_matches_float32():
    tf.keras.utils.set_random_seed(1)
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        larq_layer, ours = pair(filters=8, kernel_size=3)
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    x = tf.constant(np.random.default_rng(0).standard_normal((16, 8, 8, 8), np.float32))
    larq_layer.build(x.shape)
    ours.build(x.shape)
    ours.set_weights(larq_layer.get_weights())
    got, want = forward_and_gradients(ours, x, True), forward_and_gradients(larq_layer, x, True)
    assert got[0].dtype == tf.bfloat16
    for g, w in zip(got, want):
        g, w = tf.cast(g, tf.float32).numpy(), tf.cast(w, tf.float32).numpy()
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-2 * np.abs(w).max())


def test_the_models_binary_convs_are_one_padded_and_round_trip_their_config():
    model = models.build("resnet20_1w1a", input_shape=(8, 8, 3), num_classes=3)
    binary = [layer for layer in model.layers if isinstance(layer, lq.layers.QuantConv2D)]
    one_padded = [layer for layer in binary if isinstance(layer, layers.OnePaddedQuantConv2D)]
    assert len(one_padded) == 18 and all(layer.pad_values == 1.0 for layer in one_padded)
    clone = tf.keras.Model.from_config(model.get_config())
    assert [type(layer) for layer in clone.layers] == [type(layer) for layer in model.layers]
    zero = models.build("resnet20_1w1a", input_shape=(8, 8, 3), num_classes=3, padding="zero")
    assert not any(isinstance(layer, layers.OnePaddedQuantConv2D) for layer in zero.layers)
