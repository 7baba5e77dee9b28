"""Every model: builds per estimator family (1W1A and 1W32A) and trains a step, has the
published parameter count, converts every binary conv to LceBconv2d, and its TFLite
twin agrees with Keras in inference mode."""

import contextlib
import io

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from reste_larq import export, models
from reste_larq.quantizers import estimators

CIFAR = models.available("cifar")
IMAGENET = models.available("imagenet")
SLOW = pytest.mark.slow
# The 34-layer ImageNet nets repeat the 18-layer ones' blocks: default suite keeps the 18s.
ALL_MODELS = CIFAR + [
    pytest.param(n, marks=SLOW) if n.endswith("34") or "34_" in n else n for n in IMAGENET
]
FAMILIES = estimators()


def small_input(name):
    # Smallest input every model's strides and pools accept: keeps the cross product fast.
    return (32, 32, 3) if name in IMAGENET else (8, 8, 3)


def train_one_step(model):
    model.compile(
        tf.keras.optimizers.SGD(0.01, momentum=0.9),
        tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    shape = model.input_shape[1:]
    x = np.random.default_rng(0).standard_normal((2, *shape)).astype(np.float32)
    before = [w.numpy() for w in model.trainable_weights]
    loss = model.train_on_batch(x, np.array([0, 1]))
    assert np.isfinite(loss)
    changed = [not np.array_equal(a, w.numpy()) for a, w in zip(before, model.trainable_weights)]
    assert sum(changed) > len(changed) // 2  # gradients reach most weights


def test_available_and_errors():
    assert set(CIFAR) == {
        "resnet20_1w1a",
        "resnet20_bireal_1w1a",
        "resnet18_1w1a",
        "vgg_small_1w1a",
        "wrn20_10_1bit",
    }
    assert set(IMAGENET) == {
        "resnet18_1w1a_imagenet",
        "resnet34_1w1a_imagenet",
        "birealnet18",
        "birealnet34",
    }
    with pytest.raises(ValueError, match="choose one of resnet20_1w1a"):
        models.build("resnet21")
    with pytest.raises(ValueError, match="accepts width"):
        models.build("wrn20_10_1bit", depth=28)
    with pytest.raises(ValueError, match="choose one of"):
        models.build("resnet20_1w1a", quantizer="sgn")
    with pytest.raises(ValueError, match="padding must be one of one, zero"):
        models.build("resnet20_1w1a", padding="reflect")


@pytest.mark.parametrize(
    # the 34-layer nets repeat the 18-layer ones' blocks: in the slow cross product
    "name, a32",
    [*((n, False) for n in CIFAR + IMAGENET if "34" not in n), ("resnet20_1w1a", True)],
)
def test_each_model_builds_and_trains_a_step(name, a32):
    """Every model with its own estimator; 1W32A on ResNet-20 (every model x estimator x
    1W1A/1W32A: test_full_cross_product_trains_a_step, slow)."""
    train_one_step(models.build(name, input_shape=small_input(name), num_classes=5, a32=a32))


def two_conv_net(quantizer, a32):
    """The zoo's pieces at their smallest: float stem, two binary conv blocks (the
    model's BinarySpec: quantizers, weight scale, +1 padding), the classifier head."""
    from reste_larq.models.blocks import BinarySpec, binary_conv_block, classifier_head

    spec = BinarySpec(quantizer=quantizer, a32=a32)
    inputs = tf.keras.Input((8, 8, 3))
    x = tf.keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = binary_conv_block(binary_conv_block(x, spec, 8), spec, 8, strides=2)
    return tf.keras.Model(inputs, classifier_head(x, 5))


@pytest.mark.parametrize("family", FAMILIES + ["float"])
@pytest.mark.parametrize("a32", [False, True])
def test_each_estimator_family_trains_in_binary_conv_blocks(family, a32):
    """Every estimator in the zoo's binary conv block (every model x estimator: slow)."""
    model = two_conv_net(family, a32)
    convs = [l for l in model.layers if isinstance(l, lq.layers.QuantConv2D)]
    assert len(convs) == 2
    binary_inputs = family != "float" and not a32
    assert all((c.input_quantizer is not None) == binary_inputs for c in convs)
    train_one_step(model)


@pytest.mark.slow
@pytest.mark.parametrize("name", CIFAR + IMAGENET)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("a32", [False, True])
def test_full_cross_product_trains_a_step(name, family, a32):
    train_one_step(
        models.build(name, quantizer=family, input_shape=small_input(name), num_classes=5, a32=a32)
    )


# Published sizes: ResNet-20 0.27M, VGG-small 4.66M, CIFAR ResNet-18 11.2M,
# WRN-20-10 26.8M, ImageNet ResNet-18 11.7M / ResNet-34 21.8M.
PARAMS = {
    "resnet20_1w1a": 0.27e6,
    "resnet20_bireal_1w1a": 0.27e6,
    "resnet18_1w1a": 11.17e6,
    "vgg_small_1w1a": 4.66e6,
    "wrn20_10_1bit": 26.8e6,
    "resnet18_1w1a_imagenet": 11.7e6,
    "resnet34_1w1a_imagenet": 21.8e6,
    "birealnet18": 11.7e6,
    "birealnet34": 21.8e6,
}


def test_birealnet18_matches_larq_zoo():
    import larq_zoo

    ours = models.build("birealnet18")
    zoo = larq_zoo.literature.BiRealNet(weights=None)
    assert ours.count_params() == zoo.count_params()

    def kinds(m):  # by Larq's or Keras' class: OnePaddedQuantConv2D is a QuantConv2D
        return [
            next(c.__name__ for c in type(layer).__mro__ if not c.__module__.startswith("reste"))
            for layer in m.layers
            if isinstance(layer, (tf.keras.layers.Conv2D, tf.keras.layers.Dense))
        ]

    assert kinds(ours) == kinds(zoo)


def expected_binary_mac_ratio(model):
    """1-bit MACs / all MACs from the layers themselves: binary convs vs float layers."""
    binary = floating = 0
    for layer in model.layers:
        if isinstance(layer, (tf.keras.layers.Conv2D, tf.keras.layers.Dense)):
            out = (
                np.prod(layer.output_shape[1:-1])
                if isinstance(layer, tf.keras.layers.Conv2D)
                else 1
            )
            macs = int(np.prod(layer.kernel.shape)) * int(out)
            binary_input = getattr(getattr(layer, "input_quantizer", None), "precision", None) == 1
            if isinstance(layer, lq.layers.QuantConv2D) and binary_input:
                binary += macs
            else:
                floating += macs
    return binary / (binary + floating)


@pytest.mark.parametrize("name", CIFAR + IMAGENET)
def test_published_parameter_count_and_larq_summary(name):
    """The published size, and `lq.models.summary` works and reports the binarized
    share of MACs the layers themselves give."""
    model = models.build(name)
    assert model.count_params() == pytest.approx(PARAMS[name], rel=0.01)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        lq.models.summary(model)
    text = out.getvalue()
    assert "Number of MACs" in text
    # Larq prints the ratio only when it is > 0
    marker = "Ratio of MACs that are binarized"
    reported = float(text.split(marker)[1].split()[0]) if marker in text else 0.0
    assert reported == pytest.approx(expected_binary_mac_ratio(model), abs=1e-4)
    if export.count_binary_convs(model):  # wrn20_10_1bit is 1W32A by default: 0
        assert reported > 0.9  # Bi-Real-18: 0.924 (float 7x7 stem and 1x1 shortcuts)
    else:
        assert reported == 0.0


def with_trained_batchnorm(model):
    """Random BN statistics so that conversion is checked on a non-trivial network."""
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            for w in layer.weights:
                base = 1.0 if ("gamma" in w.name or "variance" in w.name) else 0.0
                w.assign(
                    base
                    + 0.2 * rng.standard_normal(w.shape).astype(np.float32) * (0.5 if base else 1)
                )
    return model


def max_diff_per_sample(model, x, flatbuffer=None):
    keras_out = model(x, training=False).numpy()
    tflite_out = export.predict_tflite(flatbuffer or export.convert(model), x)
    diff = np.abs(keras_out - tflite_out).reshape(len(x), -1)
    scale = np.maximum(1.0, np.abs(keras_out).reshape(len(x), -1).max(1))
    return diff.max(1) / scale, keras_out, tflite_out


def check_conversion(model, samples=8):
    """Every binary conv becomes LceBconv2d, only float convs stay CONV_2D, and the
    TFLite model computes what Keras computes in inference mode.

    TFLite fuses BN into the binary conv's output transform, so float rounding differs
    at the 1e-7 level; a pre-activation that close to 0 flips its sign in one of the two
    and the flip spreads through every later layer (in Bi-Real-18 one flipped bit
    changes exactly 3x3x64 outputs of the next conv, then more each layer). Deep
    untrained nets with ~1.5M sign inputs per image see about one such flip per image.
    So: float-tolerance agreement on a prefix through the second binary conv (too
    short for a cascade), and agreeing predictions on the whole model."""
    flatbuffer = export.convert(model)
    ops = export.op_counts(flatbuffer)
    assert ops.get("LceBconv2d", 0) == export.count_binary_convs(model) > 0
    float_convs = sum(1 for l in model.layers if type(l) is tf.keras.layers.Conv2D)
    assert ops.get("CONV_2D", 0) == float_convs

    x = (
        np.random.default_rng(1)
        .standard_normal((samples, *model.input_shape[1:]))
        .astype(np.float32)
    )
    binary = [
        l
        for l in model.layers
        if isinstance(l, lq.layers.QuantConv2D)
        and getattr(l.input_quantizer, "precision", None) == 1
    ]
    prefix = tf.keras.Model(model.input, binary[min(1, len(binary) - 1)].output)
    prefix_diff, _, _ = max_diff_per_sample(prefix, x)
    assert (prefix_diff < 1e-4).sum() >= samples - 1, prefix_diff

    diff, keras_out, tflite_out = max_diff_per_sample(model, x, flatbuffer)
    agree = (keras_out.argmax(1) == tflite_out.argmax(1)).mean()
    assert agree >= 0.75, (agree, diff)
    return diff < 1e-4


# WRN-20-10 (26.8M weights) at width 1 in the default suite: the same layers and
# binary convs, 1/100 of the weights; at its real width in the slow one.
CONVERTED = [*(n for n in CIFAR if n != "wrn20_10_1bit"), "wrn20_1_1bit", "wrn20_10_1bit"]


def build_for_conversion(name, **options):
    if name == "wrn20_1_1bit":
        return models.build("wrn20_10_1bit", width=1, **options)
    return models.build(name, **options)


@pytest.mark.parametrize(
    "name, padding",
    [
        pytest.param(
            n,
            padding,
            # zero padding: ResNet-20 here, every model in the slow suite
            marks=[SLOW]
            if n == "wrn20_10_1bit" or (padding == "zero" and n != "resnet20_1w1a")
            else [],
        )
        for padding in ("one", "zero")
        for n in CONVERTED
    ],
)
def test_cifar_models_convert_completely(name, padding):
    a32 = False  # WRN is 1W32A by default; converting its 1W1A form checks every conv
    model = with_trained_batchnorm(build_for_conversion(name, padding=padding, a32=a32))
    close = check_conversion(model)
    if name == "resnet20_1w1a":
        assert all(close)  # 0.3M sign inputs per image: flips are rare enough to demand all


@pytest.mark.parametrize("name", ["birealnet18"])
def test_imagenet_model_converts_completely(name):
    check_conversion(with_trained_batchnorm(models.build(name)), samples=4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["resnet18_1w1a_imagenet", "resnet34_1w1a_imagenet", "birealnet34"]
)
def test_imagenet_models_convert_completely_slow(name):
    check_conversion(with_trained_batchnorm(models.build(name)), samples=4)


@SLOW  # reste: test_cifar_models_convert_completely[one-resnet20_1w1a]
@pytest.mark.parametrize("quantizer", ["bnnpp", "ste"])
def test_resnet20_converts_exactly_for_estimators(quantizer):
    close = check_conversion(
        with_trained_batchnorm(models.build("resnet20_1w1a", quantizer=quantizer))
    )
    assert all(close)  # 0.3M sign inputs per image: flips are rare enough to demand all


@SLOW  # 2 estimators x 7 models: ~3 minutes
@pytest.mark.parametrize("quantizer", ["recu", "biper"])
@pytest.mark.parametrize(
    "name",
    [n for n in CONVERTED if n != "wrn20_10_1bit"] + ["resnet18_1w1a_imagenet", "birealnet18"],
)
def test_every_model_converts_for_recu_and_biper(name, quantizer):
    """ReCU's deployed weights are sign(w - mean_c(w)), BiPer's sign(sin(omega w)): both
    +-1 after folding, so every binary conv is an LceBconv2d and TFLite = Keras. (The
    34-layer nets repeat the 18s' blocks; WRN at full width is the width-1 one wider.)"""
    model = build_for_conversion(name, quantizer=quantizer, a32=False)
    check_conversion(with_trained_batchnorm(model), samples=4)


def test_a32_keeps_activations_real_and_converts_to_float_convs():
    model = models.build("resnet20_1w1a", a32=True)
    assert export.count_binary_convs(model) == 0
    ops = export.op_counts(export.convert(model))
    assert "LceBconv2d" not in ops and ops["CONV_2D"] == 19


@pytest.mark.parametrize("name", ["resnet20_1w1a", pytest.param("birealnet18", marks=SLOW)])
def test_w32_keeps_weights_real_with_binary_activations(name):
    """32W/1A (ReActNet's first step): every binary conv of the 1W1A model keeps its
    sign activations, its kernel is used as it is, and the model converts (LCE
    quantizes the activations, then runs a float conv) with TFLite = Keras."""
    model = models.build(name, w32=True, input_shape=small_input(name))
    full = models.build(name, input_shape=small_input(name))
    convs = [l for l in model.layers if isinstance(l, lq.layers.QuantConv2D)]
    binary = [l for l in full.layers if isinstance(l, lq.layers.QuantConv2D)]
    assert len(convs) == len(binary) > 0
    for w32_conv, conv in zip(convs, binary):
        assert (w32_conv.input_quantizer is None) == (conv.input_quantizer is None)
        assert w32_conv.kernel_quantizer is None and w32_conv.kernel_constraint is None
    x = np.random.RandomState(0).randn(1, *small_input(name)).astype("float32")
    conv = next(l for l in convs if l.input_quantizer is not None)
    probe = tf.keras.Model(model.input, conv.output)
    kernel = conv.kernel.numpy()
    conv_input = tf.keras.Model(model.input, conv.input)(x).numpy()
    signs = np.where(conv_input >= 0, 1.0, -1.0).astype("float32")
    # +1 padding of the sign input, as the 1W1A model's conv does
    padded = np.pad(signs, [(0, 0), (1, 1), (1, 1), (0, 0)], constant_values=1.0)
    expected = tf.nn.conv2d(padded, kernel, conv.strides, "VALID").numpy()
    np.testing.assert_allclose(probe(x).numpy(), expected, rtol=1e-5, atol=1e-4)
    assert export.count_binary_convs(model) == 0
    flatbuffer = export.convert(model)
    ops = export.op_counts(flatbuffer)
    assert "LceBconv2d" not in ops and ops["LceQuantize"] >= len(convs) - 1
    np.testing.assert_allclose(
        export.predict_tflite(flatbuffer, x), model(x, training=False).numpy(), atol=1e-3
    )


def test_w32_with_real_activations_is_refused():
    with pytest.raises(ValueError, match="nothing binary"):
        models.build("resnet20_1w1a", a32=True, w32=True)
    with pytest.raises(ValueError, match="nothing binary"):
        models.build("wrn20_10_1bit", w32=True)  # 1W32A by definition


# ---------------------------------------------------------------- structure
# What the reference (DravenALG/ReSTE) and the papers build, written out here, not read
# from the code under test: the binary convs' init and what follows each binary conv.
HE_FAN_IN = ("untruncated_normal", lambda k, cin, cout: np.sqrt(2.0 / (k * k * cin)))
HE_FAN_OUT = ("untruncated_normal", lambda k, cin, cout: np.sqrt(2.0 / (k * k * cout)))
TORCH_DEFAULT = ("uniform", lambda k, cin, cout: 1.0 / np.sqrt(3.0 * k * k * cin))
GLOROT_NORMAL = ("truncated_normal", lambda k, cin, cout: np.sqrt(2.0 / (k * k * (cin + cout))))
BINARY_CONV = {  # model: (init family and std, the layers after each binary conv)
    # resnet20.py: kaiming_normal_ on every Conv2d and Linear
    "resnet20_1w1a": (HE_FAN_IN, ["ReLU", "BatchNormalization"]),
    "resnet20_bireal_1w1a": (HE_FAN_IN, ["ReLU", "BatchNormalization"]),
    # resnet18.py (CIFAR): no init code at all, PyTorch's default kaiming_uniform(a=sqrt 5)
    "resnet18_1w1a": (TORCH_DEFAULT, ["ReLU", "BatchNormalization"]),
    # vgg_small.py: normal(0, sqrt(2 / (k*k*out)))
    "vgg_small_1w1a": (HE_FAN_OUT, ["ReLU", "BatchNormalization"]),
    # McDonnell's WRN (pre-activation: BN -> conv; the next layer is the next block's BN)
    "wrn20_10_1bit": (HE_FAN_OUT, None),
    # imagenet resnet18.py / resnet34.py: kaiming_normal_ on every Conv2d
    "resnet18_1w1a_imagenet": (HE_FAN_IN, ["ReLU", "BatchNormalization"]),
    "resnet34_1w1a_imagenet": (HE_FAN_IN, ["ReLU", "BatchNormalization"]),
    # Bi-Real Net (larq_zoo): glorot_normal, binary conv -> BN
    "birealnet18": (GLOROT_NORMAL, ["BatchNormalization"]),
    "birealnet34": (GLOROT_NORMAL, ["BatchNormalization"]),
}


def binary_convs(model):
    return [
        l
        for l in model.layers
        if isinstance(l, lq.layers.QuantConv2D) and l.kernel_quantizer is not None
    ]


def next_layers(layer, count):
    """The chain of single consumers after `layer`, as class names."""
    names = []
    for _ in range(count):
        (node,) = layer._outbound_nodes
        layer = node.outbound_layer
        names.append(type(layer).__name__)
    return names


@pytest.mark.parametrize("name", ALL_MODELS)
def test_binary_conv_init_and_order_are_the_references(name):
    (family, std_of), after = BINARY_CONV[name]
    model = models.build(name, input_shape=small_input(name), num_classes=5)
    convs = binary_convs(model)
    assert convs
    for layer in convs:
        init = layer.kernel_initializer
        # GlorotNormal is VarianceScaling(1, fan_avg, truncated_normal) without saying so
        distribution = (
            "truncated_normal"
            if isinstance(init, tf.keras.initializers.GlorotNormal)
            else init.get_config().get("distribution")
        )
        assert distribution == family, (layer.name, init.get_config())
        k, _, cin, cout = layer.kernel.shape
        w = (
            layer.kernel.latent_variable.numpy()
            if hasattr(layer.kernel, "latent_variable")
            else layer.kernel.numpy()
        )
        expected = std_of(k, cin, cout)
        # 576+ values per kernel: the sample std is within 10% of the family's
        assert np.std(w) == pytest.approx(expected, rel=0.1), layer.name
        if family == "uniform":
            assert np.max(np.abs(w)) <= np.sqrt(3) * expected * (1 + 1e-6)
        if after is not None:
            assert next_layers(layer, len(after)) == after, layer.name


@pytest.mark.parametrize("name", ALL_MODELS)
def test_batchnorm_is_pytorchs_and_padding_follows_the_choice(name):
    for padding in ("one", "zero"):
        model = models.build(
            name, input_shape=small_input(name), num_classes=5, a32=False, padding=padding
        )
        for layer in model.layers:
            if isinstance(layer, tf.keras.layers.BatchNormalization):
                assert (layer.momentum, layer.epsilon) == (0.9, 1e-5), layer.name
        for layer in binary_convs(model):
            assert layer.pad_values == (1.0 if padding == "one" else 0.0), layer.name
    # real activations are zero-padded whatever the choice
    model = models.build(
        name, input_shape=small_input(name), num_classes=5, a32=True, padding="one"
    )
    assert all(layer.pad_values == 0.0 for layer in binary_convs(model))


def test_shortcut_option_a_is_subsample_and_quarter_zero_channels():
    from reste_larq.models.blocks import ChannelPad, shortcut_option_a

    x = np.arange(2 * 6 * 6 * 16, dtype=np.float32).reshape(2, 6, 6, 16)
    inputs = tf.keras.Input((6, 6, 16))
    out = tf.keras.Model(inputs, shortcut_option_a(inputs, 32, 2))(x).numpy()
    # the reference: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))
    expected = np.zeros((2, 3, 3, 32), np.float32)
    expected[..., 8:24] = x[:, ::2, ::2, :]
    np.testing.assert_array_equal(out, expected)
    # same size: the identity
    inputs = tf.keras.Input((6, 6, 16))
    np.testing.assert_array_equal(
        tf.keras.Model(inputs, shortcut_option_a(inputs, 16, 1))(x).numpy(), x
    )
    padded = ChannelPad(64)(x).numpy()
    assert padded.shape == (2, 6, 6, 64)
    np.testing.assert_array_equal(padded[..., 24:40], x)
    assert not padded[..., :24].any() and not padded[..., 40:].any()
    assert ChannelPad.from_config(ChannelPad(64).get_config()).filters == 64


def test_bn_momentum_option_reaches_every_batchnorm():
    model = models.build("resnet20_1w1a", input_shape=(8, 8, 3), bn_momentum=0.8, sync_bn=True)
    bns = [l for l in model.layers if isinstance(l, tf.keras.layers.BatchNormalization)]
    assert len(bns) == 1 + 18 + 1 and all(l.momentum == 0.8 and l.synchronized for l in bns)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        models.build("resnet20_1w1a", bn_momentum=1.5)


BLOCK_ORDER = {  # (layer feeding each binary conv, the chain after it)
    "prelu": ("BatchNormalization", ["Add", "PReLU"]),
    "react": ("LearnableBias", ["BatchNormalization", "Add", "LearnableBias", "PReLU"]),
}


@pytest.mark.parametrize("block", ["prelu", "react"])
@pytest.mark.parametrize(
    "name",
    [
        "resnet20_1w1a",
        "resnet20_bireal_1w1a",
        pytest.param("resnet18_1w1a", marks=SLOW),
        pytest.param("resnet18_1w1a_imagenet", marks=SLOW),
    ],
)
def test_block_variants_are_built_as_published_and_convert(name, block):
    """--block prelu (BNN-tricks: BN -> sign -> bconv -> + shortcut -> PReLU) and react
    (ReActNet: RSign -> bconv -> BN -> + shortcut -> RPReLU) around every binary conv:
    the order, PReLU slopes 0.25 and zero shifts at start, and every binary conv an
    LceBconv2d with TFLite computing what Keras computes."""
    model = models.build(name, block=block, input_shape=small_input(name))
    before, after = BLOCK_ORDER[block]
    convs = binary_convs(model)
    assert len(convs) == export.count_binary_convs(
        models.build(name, input_shape=small_input(name))
    )
    for conv in convs:
        (node,) = conv._inbound_nodes
        assert type(node.inbound_layers).__name__ == before
        assert next_layers(conv, len(after)) == after
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.PReLU):
            np.testing.assert_array_equal(layer.alpha.numpy(), 0.25)
        if type(layer).__name__ == "LearnableBias":
            np.testing.assert_array_equal(layer.bias.numpy(), 0.0)
    if name in ("resnet20_1w1a", "resnet18_1w1a_imagenet"):
        check_conversion(with_trained_batchnorm(model))


def test_block_is_for_the_resnet_families_only():
    with pytest.raises(ValueError, match="has its own block"):
        models.build("vgg_small_1w1a", block="prelu")
    with pytest.raises(ValueError, match="reference, prelu, react"):
        models.build("resnet20_1w1a", block="bottleneck")


@pytest.mark.parametrize("mode", ["v1", "v2", "v3"])
def test_downsample_variants_are_the_collections(mode):
    """BNN-tricks' downsamples on chosen numbers: v1 1x1 conv -> BN -> avg-pool 2, v2
    avg-pool 2 -> 1x1 conv -> BN, v3 1x1 conv -> BN -> avg-pool 3 / stride 2 / zero
    padding 1 counted in the mean (PyTorch's count_include_pad=True)."""
    from reste_larq.models.blocks import he_normal, shortcut_conv

    inputs = tf.keras.Input((6, 6, 2))
    model = tf.keras.Model(inputs, shortcut_conv(inputs, 4, 2, initializer=he_normal, mode=mode))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 4)).astype(np.float32)
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.Conv2D):
            layer.kernel.assign(w[None, None])
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            layer.moving_variance.assign(np.full(4, 1 - layer.epsilon, np.float32))
    x = rng.standard_normal((1, 6, 6, 2)).astype(np.float32)

    def pool2(a):
        return a.reshape(1, 3, 2, 3, 2, a.shape[-1]).mean(axis=(2, 4))

    if mode == "v1":
        expected = pool2(x @ w)
    elif mode == "v2":
        expected = pool2(x) @ w
    else:
        padded = np.pad(x @ w, [(0, 0), (1, 1), (1, 1), (0, 0)])
        expected = np.stack(
            [
                np.stack([padded[0, i : i + 3, j : j + 3].sum((0, 1)) / 9 for j in (0, 2, 4)])
                for i in (0, 2, 4)
            ]
        )[None]
    np.testing.assert_allclose(model(x, training=False).numpy(), expected, rtol=1e-5, atol=1e-5)


@SLOW
def test_downsample_option_builds_converts_and_refuses_option_a():
    model = models.build("resnet18_1w1a_imagenet", downsample="v3", input_shape=(32, 32, 3))
    pools = [l for l in model.layers if isinstance(l, tf.keras.layers.AvgPool2D)]
    assert len(pools) == 3 and all(p.pool_size == (3, 3) for p in pools)
    check_conversion(with_trained_batchnorm(model))
    with pytest.raises(ValueError, match="has no 1x1 conv downsample"):
        models.build("resnet20_1w1a", downsample="v1")
