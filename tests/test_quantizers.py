"""Estimator math against independent float64 formulas, finiteness, names, errors,
serialization and LCE conversion."""

import math

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from reste_larq import quantizers as Q
from reste_larq.callbacks import EstimatorSchedule
from reste_larq.export import convert, op_counts

GRID = np.concatenate([np.linspace(-2.0, 2.0, 4001), [0.0, 0.1, -0.1, 1.5, -1.5]])
SPECIAL = np.array(
    [
        0.0,
        1e-30,
        -1e-30,
        1e30,
        -1e30,
        0.1,
        -0.1,
        1.5,
        -1.5,
        1.5000001,
        -1.5000001,
        0.0999999,
        6.0e4,
        -6.0e4,
    ]
)
# Two Larq quantizers fail at float16 magnitudes near the float16 maximum; we keep them
# available by Larq's names but our estimators do not use them there:
# - magnitude_aware_sign averages |x| in float16, which overflows (MeanAbsScaled casts);
# - swish_sign computes inf / inf = NaN once beta * |x| overflows (`bnn+` is BNNPlus).
FLOAT16_HUGE_UNSUPPORTED = {"magnitude_aware_sign", "swish_sign"}
# Every quantizer name a user can pass as input_quantizer/kernel_quantizer.
QUANTIZER_NAMES = [
    "reste",
    "ReSTE",
    "bnnpp",
    "bnn++",
    "binary_connect",
    "wrn_sign",
    "ste",
    "bnn",
    "bnn+",
    "ste_sign",
    "swish_sign",
    "approx_sign",
    "magnitude_aware_sign",
]


# ---------------------------------------------------------------- float64 formulas
def np_sign(x):
    return np.where(x >= 0, 1.0, -1.0)


def np_reste_grad(x, o, t=1.5, interval=0.1):
    # Region borders compared in float32, as the quantizer sees x, t and interval.
    ax = np.abs(np.float32(x)).astype(np.float64)
    t, interval = float(np.float32(t)), float(np.float32(interval))
    out = np.zeros_like(ax)
    mid = (ax > interval) & (ax <= t)
    out[mid] = (1.0 / o) * ax[mid] ** ((1.0 - o) / o)
    inner = ax <= interval
    out[inner] = interval ** (1.0 / o) / interval
    return out


def np_signswish(x, mu):
    x = x.astype(np.float64)
    s = 1.0 / (1.0 + np.exp(-mu * x))
    return 2.0 * s * (1.0 + mu * x * (1.0 - s)) - 1.0


def np_signswish_grad(x, mu):
    z = mu * x.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        g = mu * (2.0 - z * np.tanh(z / 2.0)) / (1.0 + np.cosh(z))
    return np.nan_to_num(g, nan=0.0)


def grad_of(fn, x, dtype=tf.float32):
    x = tf.constant(x, dtype)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
    return y.numpy(), tape.gradient(y, x).numpy()


# ------------------------------------------------------------------------- ReSTE
@pytest.mark.parametrize("o", [1.0, 1.5, 2.0, 3.0, 5.0])
def test_reste_forward_and_gradient_match_formula(o):
    q = Q.ReSTE(o=o)
    y, g = grad_of(q, GRID)
    np.testing.assert_array_equal(y, np_sign(GRID))
    np.testing.assert_allclose(g, np_reste_grad(GRID, o), rtol=2e-5, atol=1e-6)


def test_reste_o_is_schedulable_without_retracing():
    q = Q.ReSTE()
    traces = []

    @tf.function
    def grad(x):
        traces.append(1)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = q(x)
        return tape.gradient(y, x)

    x = tf.constant([0.5])
    for o in (1.0, 2.0, 3.0):
        q.o = o
        np.testing.assert_allclose(grad(x).numpy(), np_reste_grad(np.array([0.5]), o), rtol=1e-6)
    assert len(traces) == 1


def test_reste_equivalent_forward():
    x = tf.constant([-0.25, 0.0, 0.25, 1.0])
    np.testing.assert_allclose(Q.reste_equivalent_forward(x, 2.0).numpy(), [-0.5, 0.0, 0.5, 1.0])
    np.testing.assert_allclose(Q.reste_equivalent_forward(x, 1.0).numpy(), x.numpy())


# ------------------------------------------------------------------------- BNN++
@pytest.mark.parametrize("mu", [0.5, 1.0, 5.0, 10.0, 50.0])
def test_bnnpp_training_forward_and_gradient_match_formula(mu):
    q = Q.BNNpp(mu=mu)
    y, g = grad_of(lambda x: q(x, training=True), GRID)
    np.testing.assert_allclose(y, np_signswish(GRID, mu), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g, np_signswish_grad(GRID, mu), rtol=1e-4, atol=1e-5 * mu)


def test_bnnpp_inference_forward_is_sign():
    q = Q.BNNpp(mu=3.0)
    np.testing.assert_array_equal(
        q(tf.constant(GRID, tf.float32), training=False).numpy(), np_sign(GRID)
    )
    np.testing.assert_array_equal(q(tf.constant(GRID, tf.float32)).numpy(), np_sign(GRID))


def test_bnnpp_follows_keras_training_flag_inside_a_model():
    inputs = tf.keras.Input((4,))
    model = tf.keras.Model(inputs, Q.BNNpp(mu=1.0)(inputs))
    x = np.array([[0.3, -0.2, 0.05, 2.0]], np.float32)
    np.testing.assert_array_equal(model(x, training=False).numpy(), np_sign(x))
    np.testing.assert_allclose(model(x, training=True).numpy(), np_signswish(x, 1.0), rtol=1e-5)


# ------------------------------------------------------------- identity backwards
@pytest.mark.parametrize("beta", [1.0, 5.0, 10.0])
def test_bnn_plus_sign_forward_signswish_backward(beta):
    y, g = grad_of(Q.BNNPlus(beta=beta), GRID)
    np.testing.assert_array_equal(y, np_sign(GRID))
    np.testing.assert_allclose(g, np_signswish_grad(GRID, beta), rtol=1e-4, atol=1e-5 * beta)


def test_binary_connect_identity_backward():
    y, g = grad_of(lq.quantizers.get("binary_connect"), GRID)
    np.testing.assert_array_equal(y, np_sign(GRID))
    np.testing.assert_array_equal(g, np.ones_like(GRID))


def test_wrn_sign_scale_and_identity_backward():
    w = np.random.default_rng(0).standard_normal((3, 3, 8, 4)).astype(np.float32)
    w[0, 0, 0, 0] = 0.0
    y, g = grad_of(lq.quantizers.get("wrn_sign"), w)
    np.testing.assert_allclose(y, math.sqrt(2.0 / (3 * 3 * 8)) * np_sign(w), rtol=1e-6)
    np.testing.assert_array_equal(g, np.ones_like(w))


@pytest.mark.parametrize(
    "inner, inner_grad",
    [
        ("ste", lambda w: (np.abs(w) <= 1).astype(np.float64)),
        (Q.ReSTE(o=1.0), lambda w: np_reste_grad(w, 1.0)),
        (Q.ReSTE(o=3.0), lambda w: np_reste_grad(w, 3.0)),
    ],
    ids=["ste", "reste_o1", "reste_o3"],
)
def test_mean_abs_scaled_forward_and_gradient(inner, inner_grad):
    """q(w) = mean|w| * sign(w), differentiated by hand: the scale is not detached (as
    the reference's `scaler`), so
    dL/dw_i = mean|w| q'(w_i) dy_i + sign(w_i) / N * sum_j dy_j sign(w_j)."""
    w = np.random.default_rng(1).standard_normal((3, 3, 4, 2)).astype(np.float32) * 0.5
    w[0, 0, 0, :] = [0.0, 0.05]  # 0 and ReSTE's inner region
    q = Q.MeanAbsScaled(inner)
    dy = np.random.default_rng(2).standard_normal(w.shape).astype(np.float32)
    x = tf.constant(w)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = q(x)
    g = tape.gradient(y, x, output_gradients=tf.constant(dy)).numpy()
    w64, dy64 = w.astype(np.float64), dy.astype(np.float64)
    m = np.abs(w64).mean()
    np.testing.assert_allclose(y.numpy(), m * np_sign(w64), rtol=1e-6)
    expected = m * inner_grad(w) * dy64 + (dy64 * np_sign(w64)).sum() * np.sign(w64) / w.size
    np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-6)


def reference_reste_backward(x, o, t=1.5, interval=0.1):
    """Binary_ReSTE.backward of the reference, mask by mask as its code writes it."""
    tmp = np.zeros_like(x)
    mask1 = (x <= t) & (x > interval)
    tmp[mask1] = (1 / o) * np.power(x[mask1], (1 - o) / o)
    mask2 = (x >= -t) & (x < -interval)
    tmp[mask2] = (1 / o) * np.power(-x[mask2], (1 - o) / o)
    tmp[(x <= interval) & (x >= 0)] = interval ** (1 / o) / interval
    tmp[(x <= 0) & (x >= -interval)] = -(-(interval ** (1 / o))) / interval
    return tmp


GOLDEN_X = np.array([-2.0, -1.5, -1.0, -0.5, -0.1, -0.05, 0.0, 0.05, 0.1, 0.5, 1.0, 1.5, 2.0])


@pytest.mark.parametrize("o", [1.0, 2.0, 3.0])
def test_reste_input_gradient_golden(o):
    """A 1x1 binary conv with fixed weights: the gradient reaching its input is the
    reference's backward times the weights' back-projection (computed here)."""
    weights = np.array([[0.3, -0.2, 0.7]], np.float32).reshape(1, 1, 1, 3)
    layer = lq.layers.QuantConv2D(
        3, 1, use_bias=False, input_quantizer=Q.ReSTE(o=o), kernel_quantizer=None
    )
    x = tf.constant(GOLDEN_X.reshape(1, 1, -1, 1), tf.float32)
    layer.build(x.shape)
    layer.kernel.assign(weights)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
    upstream = np.array([1.0, 2.0, -1.0], np.float32)
    g = tape.gradient(
        y, x, output_gradients=tf.constant(np.tile(upstream, (13, 1)).reshape(y.shape))
    )
    back = float(weights.ravel() @ upstream)  # d y / d sign(x) summed over filters: 0.6
    np.testing.assert_allclose(
        g.numpy().ravel(), back * reference_reste_backward(GOLDEN_X, o), rtol=1e-5
    )
    if o == 3.0:  # worked by hand: 1/3 * 0.5^(-2/3), 0.1^(1/3) / 0.1, 1/3 * 1.5^(-2/3)
        golden = dict(zip(GOLDEN_X, g.numpy().ravel() / back))
        assert golden[0.5] == pytest.approx(0.529134, rel=1e-5)
        assert golden[-0.05] == golden[0.0] == golden[0.1] == pytest.approx(4.641589, rel=1e-5)
        assert golden[-1.5] == pytest.approx(0.254381, rel=1e-5)
        assert golden[2.0] == golden[-2.0] == 0.0


@pytest.mark.parametrize(
    "fn, args",
    [
        (Q._reste_backward, (tf.constant(2.5), 1.5, 0.1)),
        (Q._signswish_backward, (tf.constant(20.0),)),
    ],
    ids=["reste_backward", "signswish_backward"],
)
@pytest.mark.parametrize("shape", [(4, 8, 8, 16), (3, 3, 16, 32), (7,), ()])
def test_flat_xla_kernels_equal_their_nhwc_compilation(fn, args, shape):
    """The XLA estimator kernels run on flattened tensors (faster on CPU); their values
    are bit-identical to the same XLA function on the tensor's own shape."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32) * 2
    if x.size >= len(SPECIAL):
        x.flat[: len(SPECIAL)] = SPECIAL
    dy = rng.standard_normal(shape).astype(np.float32)
    flat = fn(tf.constant(x), tf.constant(dy), *args)
    assert flat.shape == shape
    np.testing.assert_array_equal(flat.numpy(), fn.compiled(x, dy, *args).numpy())


def test_flat_signswish_forward_equals_its_nhwc_compilation():
    x = tf.constant(np.linspace(-3, 3, 4 * 4 * 16, dtype=np.float32).reshape(1, 4, 4, 16))
    mu = tf.constant(5.0)
    np.testing.assert_array_equal(
        Q._signswish_forward(x, mu).numpy(), Q._signswish_forward.compiled(x, mu).numpy()
    )


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16, tf.float16])
@pytest.mark.parametrize("shape", [(4, 32, 32, 16), (3, 3, 16, 32), (7,)])
@pytest.mark.parametrize("clip_value", [1.0, 0.5, None])
def test_fused_ste_sign_equals_larq_ste_sign_bit_for_bit(dtype, shape, clip_value):
    """ "ste" is `FusedSteSign`: Larq's `ste_sign` with a one-pass backward on
    activations (XLA; the 4x32x32x16 case) and Larq's ops on kernel-sized tensors."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32) * 1.2
    x.flat[: len(SPECIAL)] = np.clip(SPECIAL, -6e4, 6e4)[: x.size]
    x.flat[:4] = [1.0, -1.0, 0.5, -0.5][: x.size]  # the clip borders themselves
    x, dy = tf.cast(x, dtype), tf.cast(rng.standard_normal(shape), dtype)
    grads = []
    for fn in (Q.fused_ste_sign, lq.quantizers.ste_sign):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x, clip_value=clip_value)
        grads.append((y, tape.gradient(y, x, output_gradients=dy)))
    (y_fused, g_fused), (y_larq, g_larq) = grads
    bits = np.uint32 if dtype == tf.float32 else np.uint16
    np.testing.assert_array_equal(y_fused.numpy().view(bits), y_larq.numpy().view(bits))
    np.testing.assert_array_equal(g_fused.numpy().view(bits), g_larq.numpy().view(bits))
    if clip_value is not None:  # the test would notice a gradient that ignores the clip
        assert (g_larq.numpy()[np.abs(x.numpy().astype(np.float32)) > clip_value] == 0).all()


def test_ste_names_resolve_to_fused_ste_sign_and_ste_sign_stays_larqs():
    assert type(lq.quantizers.get("ste")) is Q.FusedSteSign
    assert type(lq.quantizers.get("bnn")) is Q.FusedSteSign
    assert type(lq.quantizers.get("ste_sign")) is lq.quantizers.SteSign
    assert isinstance(lq.quantizers.get("ste"), lq.quantizers.SteSign)
    assert Q.estimator_quantizers("bnnpp")[0].__class__ is Q.FusedSteSign


# --------------------------------------------------- every quantizer, by name
@pytest.mark.parametrize("name", QUANTIZER_NAMES)
def test_names_resolve_to_binary_quantizers(name):
    q = lq.quantizers.get(name)
    assert getattr(q, "precision", None) == 1
    layer = lq.layers.QuantConv2D(4, 3, input_quantizer=name, kernel_quantizer=name, use_bias=False)
    assert layer(tf.ones((1, 5, 5, 2))).shape == (1, 3, 3, 4)


@pytest.mark.parametrize("name", QUANTIZER_NAMES)
@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_gradients_finite_everywhere(name, policy):
    tf.keras.mixed_precision.set_global_policy(policy)
    q = lq.quantizers.get(name)
    dtype = tf.float16 if policy == "mixed_float16" else tf.float32
    x = SPECIAL.reshape(-1, 1) * np.ones((1, 2))  # 2D so magnitude-aware/wrn get a fan
    with np.errstate(over="ignore"):
        values = x.astype(np.float16 if dtype == tf.float16 else np.float32)
    values = values[np.isfinite(values).all(axis=1)]  # 1e30 is inf in float16: not an input
    if dtype == tf.float16 and name in FLOAT16_HUGE_UNSUPPORTED:
        values = values[np.abs(values).max(axis=1) < 1e4]
    schedule_values = {"reste": [1.0, 1.5, 2.0, 3.0, 10.0], "bnnpp": [0.1, 1.0, 5.0, 10.0, 1000.0]}
    key = Q.canonical_estimator(name) if name in ("ReSTE", "bnn++") else name
    for value in schedule_values.get(key, [None]):
        if value is not None:
            q.schedule_variable.assign(value)
        y, g = grad_of(
            lambda t: q(t, training=True) if isinstance(q, Q.BNNpp) else q(t), values, dtype
        )
        assert np.isfinite(y).all(), (name, value)
        assert np.isfinite(g).all(), (name, value, g)


@pytest.mark.parametrize("name", QUANTIZER_NAMES)
def test_flip_ratio_metric_supported(name):
    q = lq.quantizers.get(name)
    if not hasattr(q, "_custom_metrics"):
        pytest.skip("not a Larq _BaseQuantizer")
    layer = lq.layers.QuantDense(3, kernel_quantizer=type(q)(metrics=["flip_ratio"]))
    layer(tf.ones((2, 4)))
    assert any("flip_ratio" in m.name for m in layer.metrics)


# ------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "quantizer",
    [
        Q.ReSTE(o=2.0, t=1.2, interval=0.05),
        Q.BNNpp(mu=7.0),
        Q.BinaryConnect(),
        Q.WrnSign(),
        Q.BNNPlus(beta=3.0),
        Q.MeanAbsScaled(Q.ReSTE(o=1.5)),
        Q.FusedSteSign(clip_value=0.5),
    ],
)
def test_config_round_trip(quantizer):
    config = lq.quantizers.serialize(quantizer)
    clone = lq.quantizers.get(config)
    assert type(clone) is type(quantizer)
    assert clone.get_config() == quantizer.get_config()
    x = tf.constant(GRID, tf.float32)
    np.testing.assert_array_equal(clone(x).numpy(), quantizer(x).numpy())


def test_config_carries_current_schedule_value():
    q = Q.ReSTE()
    q.o = 2.5
    assert Q.ReSTE.from_config(q.get_config()).o == 2.5


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Q.ReSTE(o=0.5), "o must be >= 1"),
        (lambda: Q.ReSTE(t=0.0), "t must be > 0"),
        (lambda: Q.ReSTE(interval=0.0), "interval must be in (0, t)"),
        (lambda: Q.ReSTE(t=1.0, interval=1.0), "interval must be in (0, t)"),
        (lambda: Q.BNNpp(mu=0.0), "mu must be > 0"),
        (lambda: Q.BNNpp(mu=-1.0), "mu must be > 0"),
        (lambda: Q.estimator_quantizers("resté"), "choose one of"),
        (lambda: setattr(Q.ReSTE(), "o", 0.9), "o must be >= 1"),
    ],
)
def test_bad_values_raise_value_error_naming_allowed(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_unknown_estimator_lists_choices():
    with pytest.raises(ValueError) as error:
        Q.canonical_estimator("nope")
    for name in Q.estimators():
        assert name in str(error.value)


# ----------------------------------------------------- models: save, load, convert
def small_net(name):
    inputs = tf.keras.Input((8, 8, 3))
    x = tf.keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = tf.keras.layers.BatchNormalization()(x)
    input_q, kernel_q = Q.estimator_quantizers(name)
    x = lq.layers.QuantConv2D(
        16,
        3,
        padding="same",
        pad_values=1.0,
        use_bias=False,
        input_quantizer=input_q,
        kernel_quantizer=Q.MeanAbsScaled(kernel_q),
    )(x)
    x = tf.keras.layers.BatchNormalization()(tf.keras.layers.ReLU()(x))
    x = lq.layers.QuantConv2D(
        16,
        3,
        padding="same",
        pad_values=1.0,
        use_bias=False,
        input_quantizer=Q.estimator_quantizers(name)[0],
        kernel_quantizer=Q.estimator_quantizers(name)[1],
    )(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(tf.keras.layers.BatchNormalization()(x))
    return tf.keras.Model(inputs, tf.keras.layers.Dense(4)(x))


@pytest.mark.parametrize("name", ["reste", "bnnpp", "bnnpp_all"])
@pytest.mark.parametrize("fmt", ["h5", "tf"])
def test_model_save_load_identical_and_trains_with_schedule(name, fmt, tmp_path):
    model = small_net(name)
    schedule = EstimatorSchedule(epochs=4, o_end=3.0)
    schedule.apply(model, 2)  # o / mu mid-schedule, to see it survive
    x = np.random.default_rng(0).standard_normal((6, 8, 8, 3)).astype(np.float32)
    y = np.arange(6) % 4
    path = str(tmp_path / ("m.h5" if fmt == "h5" else "m"))
    model.save(path, save_format=fmt)
    loaded = tf.keras.models.load_model(path)
    np.testing.assert_array_equal(
        loaded(x, training=False).numpy(), model(x, training=False).numpy()
    )
    before = [q.schedule_variable.numpy() for q in Q.scheduled_quantizers(model)]
    after = [q.schedule_variable.numpy() for q in Q.scheduled_quantizers(loaded)]
    assert len(after) == (4 if name in ("reste", "bnnpp_all") else 2) and after == before

    loaded.compile("sgd", tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    loaded.fit(x, y, epochs=4, initial_epoch=3, verbose=0, callbacks=[schedule])
    values = [float(q.schedule_variable.numpy()) for q in Q.scheduled_quantizers(loaded)]
    expected = schedule.o_at(3) if name == "reste" else schedule.mu_at(3)
    assert values == pytest.approx([expected] * len(values)) and values
    assert np.isfinite(loaded(x).numpy()).all()


@pytest.mark.parametrize("name", ["reste", "bnnpp", "bnnpp_all", "ste", "binary_connect", "bnn+"])
def test_small_network_converts_to_lce_bconv(name):
    model = small_net(name)
    ops = op_counts(convert(model))
    assert ops["LceBconv2d"] == 2
    assert ops["CONV_2D"] == 1  # only the float stem


@pytest.mark.parametrize("name", ["reste", "bnnpp_all"])
def test_mixed_float16_network_has_finite_gradients(name):
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    model = small_net(name)
    schedule = EstimatorSchedule(epochs=3, o_end=3.0)
    x = np.zeros((4, 8, 8, 3), np.float32)
    x[1] = 1e-30
    x[2] = 100.0  # large, but the float stem conv's sums stay below float16's 65504
    x[3] = np.random.default_rng(0).standard_normal((8, 8, 3))
    for epoch in range(3):
        schedule.apply(model, epoch)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(tf.cast(model(x, training=True), tf.float32)))
        grads = tape.gradient(loss, model.trainable_weights)
        assert all(np.isfinite(g.numpy()).all() for g in grads if g is not None), epoch
