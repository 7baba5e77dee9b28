"""ReCU and BiPer against their public codes' formulas, written again in float64 numpy
(z-hXu/ReCU `imagenet/modules/binarized_modules.py` and `cifar/main.py` `cpt_tau`;
edmav4/BiPer `cifar10/modules/binarized_modules.py` and `main.py`'s loss_reg), at
points on both sides of every threshold and at both ends of every schedule."""

import math

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from reste_larq import quantizers as Q
from reste_larq.callbacks import EstimatorSchedule
from reste_larq.export import convert, op_counts

K = 2.0 * math.sqrt(2.0)


def np_sign(x):
    return np.where(x >= 0, 1.0, -1.0)


def np_recu(w, tau, dy):
    """Forward sign(clamp(w1)) and d(sum(dy * q))/dw by hand: identity through sign,
    1 inside the clamp, then back through w1 = K (w - mean) / sqrt(var + 1e-5) per
    output channel (the last axis here; torch's first)."""
    w = w.astype(np.float64).reshape(-1, w.shape[-1])
    n = w.shape[0]
    w0 = w - w.mean(0)
    s = np.sqrt(w0.var(0, ddof=1) + 1e-5)
    w1 = K * w0 / s
    q = -np.mean(np.abs(w1)) * np.log(2.0 - 2.0 * tau)
    forward = np_sign(np.clip(w1, -q, q))
    g1 = dy.reshape(w.shape) * (np.abs(w1) <= q)
    g0 = K / s * (g1 - w0 * (w0 * g1).sum(0) / ((n - 1) * s**2))
    return forward, g0 - g0.mean(0), w1, q


def np_recu_activation(x, dy):
    """sign(a0), a0 = x / sqrt(var + 1e-5) per sample; backward max(0, 2 - 2|a0|) dy,
    then through the normalization."""
    shape = x.shape
    x = x.astype(np.float64).reshape(shape[0], -1)
    n = x.shape[1]
    centered = x - x.mean(1, keepdims=True)
    s = np.sqrt(x.var(1, ddof=1, keepdims=True) + 1e-5)
    a0 = x / s
    g0 = dy.reshape(x.shape) * np.maximum(0.0, 2.0 - 2.0 * np.abs(a0))
    gx = g0 / s - centered * (g0 * x).sum(1, keepdims=True) / ((n - 1) * s**3)
    return np_sign(x).reshape(shape), gx.reshape(shape), a0


def grads(fn, x, dy):
    x = tf.constant(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
        loss = tf.reduce_sum(y * tf.constant(dy, tf.float32))
    return y.numpy(), tape.gradient(loss, x).numpy()


@pytest.mark.parametrize("tau", [0.51, 0.85, 0.9, 0.99])
def test_recu_weights_match_the_recu_code(tau):
    rng = np.random.default_rng(0)
    w = rng.laplace(size=(3, 3, 8, 4)) * 0.05
    w[0, 0, 0] = 0.0
    dy = rng.standard_normal(w.shape)
    y, g = grads(lambda t: Q.ReCU(tau)(t), w, dy)
    forward, gradient, w1, q = np_recu(w, tau, dy)
    np.testing.assert_array_equal(y.reshape(forward.shape), forward)
    np.testing.assert_allclose(g.reshape(gradient.shape), gradient, rtol=2e-4, atol=1e-5)
    clamped = np.abs(w1) > q  # both sides of the clamp are exercised where tau is low
    if tau <= 0.85:
        assert 0 < clamped.sum() < clamped.size
        assert (g.reshape(gradient.shape)[clamped] != 0).any()  # via the standardization
    # the deployed forward is sign(w - mean_c(w)): the clamp never changes a sign
    np.testing.assert_array_equal(forward, np_sign(w.reshape(-1, 4) - w.reshape(-1, 4).mean(0)))


def test_recu_activation_matches_the_recu_code_and_is_sign_at_inference():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 4, 5)) * np.array([0.1, 1.0, 10.0]).reshape(3, 1, 1, 1)
    x[0, 0, 0, 0] = 0.0
    dy = rng.standard_normal(x.shape)
    q = Q.ReCUActivation()
    y, g = grads(lambda t: q(t, training=True), x, dy)
    forward, gradient, a0 = np_recu_activation(x, dy)
    np.testing.assert_array_equal(y, forward)
    np.testing.assert_allclose(g, gradient, rtol=2e-4, atol=1e-5)
    assert (np.abs(a0) > 1).any() and (np.abs(a0) < 1).any()  # both sides of |a0| = 1
    np.testing.assert_array_equal(q(tf.constant(x, tf.float32), training=False).numpy(), forward)


@pytest.mark.parametrize("binary", [True, False])
def test_biper_weights_and_regularizer_match_the_biper_code(binary):
    freq, tau = 20.0, 0.0468
    # both sides of sin's zeros (w = k pi / 20) and its peaks
    w = np.array([0.0, 1e-4, -1e-4, math.pi / 20 - 1e-3, math.pi / 20 + 1e-3, math.pi / 40, 0.3])
    w = w.reshape(-1, 1) * np.ones((1, 3))
    dy = np.random.default_rng(2).standard_normal(w.shape)
    q = Q.BiPer(freq, tau, binary)
    y, g = grads(q, w, dy)
    wave = np.sin(freq * w)
    np.testing.assert_allclose(y, np_sign(wave) if binary else wave, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g, freq * np.cos(freq * w) * dy, rtol=1e-4, atol=1e-5)
    assert q.precision == (1 if binary else 32)
    layer = lq.layers.QuantConv2D(2, 1, kernel_quantizer=Q.BiPer(freq, tau, binary), use_bias=False)
    layer(tf.ones((1, 2, 2, 3)))
    kernel = layer.kernel.numpy().astype(np.float64)
    expected = tau * np.mean(0.5 - 0.5 * np.cos(2 * freq * kernel))
    assert [float(l) for l in layer.losses] == pytest.approx([expected], rel=1e-5)


def test_recu_tau_schedule_is_the_recu_codes_cpt_tau():
    epochs = 600
    for e in (0, 1, 300, 599, 600):
        a = (0.99 - 0.85) / (math.e - 1)
        assert Q.recu_tau_at(e, epochs) == pytest.approx(a * math.e ** (e / epochs) + 0.85 - a)
    assert Q.recu_tau_at(0, epochs) == pytest.approx(0.85)
    assert Q.recu_tau_at(epochs, epochs) == pytest.approx(0.99)
    model = tf.keras.Sequential(
        [
            tf.keras.Input((4, 4, 2)),
            lq.layers.QuantConv2D(
                3, 3, input_quantizer="recu_activation", kernel_quantizer="recu", use_bias=False
            ),
        ]
    )
    schedule = EstimatorSchedule(epochs=10)
    assert schedule.apply(model, 5) == {"tau": pytest.approx(Q.recu_tau_at(5, 10))}
    assert Q.scheduled_quantizers(model, Q.ReCU)[0].tau == pytest.approx(Q.recu_tau_at(5, 10))
    with pytest.raises(ValueError, match=r"tau must be in \(0.5, 1\)"):
        Q.ReCU(1.0)


@pytest.mark.parametrize(
    "quantizer", [Q.ReCU(0.9), Q.ReCUActivation(), Q.BiPer(10.0, 0.01), Q.BiPerStage1()]
)
def test_config_round_trip(quantizer):
    clone = lq.quantizers.get(lq.quantizers.serialize(quantizer))
    assert type(clone) is type(quantizer) and clone.get_config() == quantizer.get_config()


SPECIAL = np.array([0.0, 1e-30, -1e-30, 1e30, -1e30, 0.1, -0.1, 1.0, -1.0, 6e4, -6e4])


@pytest.mark.parametrize("name", ["recu", "recu_activation", "biper", "biper_stage1"])
def test_gradients_finite_everywhere(name):
    q = lq.quantizers.get(name)
    x = np.stack([SPECIAL, SPECIAL[::-1], np.full_like(SPECIAL, 1e-30)], -1)  # 3 channels
    for value in [0.51, 0.85, 0.99, 0.999999] if name == "recu" else [None]:
        if value is not None:
            q.tau = value
        for batch in (x[None, :, :, None], x[None, None]):  # (1, 11, 3, 1), (1, 1, 11, 3)
            call = (lambda t: q(t, training=True)) if name == "recu_activation" else q
            y, g = grads(call, batch, np.ones(batch.shape))
            assert np.isfinite(y).all() and np.isfinite(g).all(), (name, value, g)


@pytest.mark.parametrize("name", ["recu", "biper"])
def test_small_network_converts_to_lce_bconv_and_tflite_equals_keras(name):
    from reste_larq.export import predict_tflite

    inputs = tf.keras.Input((8, 8, 3))
    x = tf.keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = tf.keras.layers.BatchNormalization()(x)
    for _ in range(2):
        input_q, kernel_q = Q.estimator_quantizers(name)
        x = lq.layers.QuantConv2D(
            8, 3, padding="same", pad_values=1.0, use_bias=False,
            input_quantizer=input_q, kernel_quantizer=Q.MeanAbsScaled(kernel_q),
        )(x)  # fmt: skip
        x = tf.keras.layers.BatchNormalization()(x)
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(4)(tf.keras.layers.Flatten()(x)))
    # BatchNorm statistics of a trained network: with fresh ones (mean 0, beta 0) every
    # zero accumulation of a binary conv is an exact tie at sign's threshold, which
    # TFLite's fused BN rounds either way (see tests/test_models.py check_conversion)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            for w in layer.weights:
                base = 1.0 if ("gamma" in w.name or "variance" in w.name) else 0.0
                w.assign(base + 0.1 * rng.standard_normal(w.shape).astype(np.float32))
    flatbuffer = convert(model)
    assert op_counts(flatbuffer)["LceBconv2d"] == 2
    x = np.random.default_rng(3).standard_normal((4, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(
        predict_tflite(flatbuffer, x), model(x, training=False).numpy(), atol=1e-3
    )


@pytest.mark.parametrize("name", ["recu", "biper"])
def test_frozen_fraction_is_not_claimed_for_recu_and_biper(name):
    """ReCU's derivative is no per-weight diagonal and BiPer's wave flips either way:
    frozen_fraction would count the wrong thing, so it is NaN (STE's is a number)."""
    from reste_larq import callbacks as cb
    from reste_larq import models

    assert np.isnan(cb.frozen_fraction(models.build("resnet20_1w1a", quantizer=name)))
    assert 0.0 <= cb.frozen_fraction(models.build("resnet20_1w1a", quantizer="ste")) <= 1.0
