"""The shared pieces of every model: the binary conv and its quantizer choices in one
place (`BinarySpec`), shortcuts, BatchNorm with PyTorch's defaults, and heads."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import larq as lq
import tensorflow as tf

from reste_larq.errors import ConfigError
from reste_larq.layers import OnePaddedQuantConv2D
from reste_larq.quantizers import MeanAbsScaled, canonical_estimator, estimator_quantizers

PADDINGS = ("one", "zero")
# The unit around each binary conv (`binary_unit`): the ReSTE reference's, the
# BNN-tricks collection's PReLU block, ReActNet's RSign / RPReLU.
BLOCKS = ("reference", "prelu", "react")
# The float downsample of a shortcut (`shortcut_conv`): the reference's strided 1x1 conv,
# or one of the BNN-tricks collection's v1 / v2 / v3.
DOWNSAMPLES = ("reference", "v1", "v2", "v3")


def he_normal(mode: str = "fan_in"):
    """PyTorch's kaiming_normal_ (ReLU gain): an *untruncated* normal, std sqrt(2/fan)."""
    return tf.keras.initializers.VarianceScaling(2.0, mode, "untruncated_normal")


def torch_default():
    """PyTorch's default Conv/Linear init, kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in))."""
    return tf.keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform")


# PyTorch's initializers by name (factories: one fresh instance per layer).
TORCH_INITIALIZERS = {
    "he_normal": he_normal,
    "he_normal_fan_out": lambda: he_normal("fan_out"),
    "torch_default": torch_default,
}

# PyTorch's BatchNorm2d momentum 0.1 is Keras' 0.9 (Keras keeps 0.9 of the old average).
DEFAULT_BN_MOMENTUM = 0.9
_BN_SETTINGS = contextvars.ContextVar(
    "reste_larq_bn", default={"synchronized": False, "momentum": DEFAULT_BN_MOMENTUM}
)


@contextlib.contextmanager
def batch_norm_settings(synchronized: bool = False, momentum: float = DEFAULT_BN_MOMENTUM):
    """Within this context `batch_norm` makes BN layers with these settings.

    synchronized: cross-replica statistics (per-replica statistics hurt BNN accuracy,
        the ReSTE authors' warning).
    momentum: Keras' moving-average momentum (BNN-tricks' PyTorch 0.2 is 0.8 here).
    """
    if not 0.0 <= momentum < 1.0:
        raise ConfigError(f"BatchNorm momentum must be in [0, 1) (got {momentum})")
    token = _BN_SETTINGS.set({"synchronized": bool(synchronized), "momentum": float(momentum)})
    try:
        yield
    finally:
        _BN_SETTINGS.reset(token)


def batch_norm(name=None, affine: bool = True):
    """BatchNorm with PyTorch's defaults (momentum 0.1 there = 0.9 here, eps 1e-5), or
    the momentum and synchronization of the enclosing `batch_norm_settings`."""
    settings = _BN_SETTINGS.get()
    return tf.keras.layers.BatchNormalization(
        momentum=settings["momentum"],
        epsilon=1e-5,
        center=affine,
        scale=affine,
        name=name,
        synchronized=settings["synchronized"],
    )


@dataclasses.dataclass(frozen=True)
class BinarySpec:
    """How every binary conv of a model is made: the one place for quantizer options.

    quantizer: estimator name (`reste_larq.quantizers.estimators()`), or "float" for
        the full-precision twin of the architecture.
    a32: keep activations real (1W/32A).
    w32: keep weights real, activations binary (32W/1A: ReActNet's first step).
    padding: "one" pads the binarized input with +1 (LCE's fast path, bit-packed
        output); "zero" pads with 0 as the PyTorch reference does (LCE converts it with
        a correction pass). With a32 the input is real and is always zero-padded.
    weight_scale: multiply the binary kernel by the layer's mean |w| (ReSTE reference).
    block: the unit around each binary conv in the ResNet families (`binary_unit`).
    downsample: the float shortcut downsample of the ResNet-18/34 nets (`shortcut_conv`).
    """

    quantizer: str = "reste"
    a32: bool = False
    w32: bool = False
    padding: str = "one"
    weight_scale: bool = True
    kernel_initializer: object = "he_normal"
    kernel_constraint: object = None
    block: str = "reference"
    downsample: str = "reference"

    def __post_init__(self):
        if self.downsample not in DOWNSAMPLES:
            raise ConfigError(
                f"downsample must be one of {', '.join(DOWNSAMPLES)} (got {self.downsample!r})"
            )
        if self.block not in BLOCKS:
            raise ConfigError(f"block must be one of {', '.join(BLOCKS)} (got {self.block!r})")
        if self.quantizer != "float":
            object.__setattr__(self, "quantizer", canonical_estimator(self.quantizer))
        if self.padding not in PADDINGS:
            raise ConfigError(
                f"padding must be one of {', '.join(PADDINGS)} (got {self.padding!r})"
            )
        if self.a32 and self.w32:
            raise ConfigError("a32 and w32 together leave nothing binary; use quantizer 'float'")

    @property
    def binary(self) -> bool:
        return self.quantizer != "float"

    def initializer(self):
        """A fresh initializer instance for one binary conv: "he_normal" (PyTorch's
        kaiming_normal_), "he_normal_fan_out", "torch_default" (PyTorch's default
        Conv init), or any Keras initializer name."""
        init = self.kernel_initializer
        if isinstance(init, str) and init in TORCH_INITIALIZERS:
            return TORCH_INITIALIZERS[init]()
        return tf.keras.initializers.get(init)

    def conv(self, filters, kernel_size=3, strides=1, name=None) -> lq.layers.QuantConv2D:
        """A QuantConv2D with this spec's quantizers (fresh instances per layer)."""
        input_q = kernel_q = None
        if self.binary:
            input_q, kernel_q = estimator_quantizers(self.quantizer, a32=self.a32, w32=self.w32)
            if self.weight_scale and kernel_q is not None:
                kernel_q = MeanAbsScaled(kernel_q)
        one_pad = self.padding == "one" and input_q is not None
        # One-padding without a padded copy while training (reste_larq/layers.py).
        layer = OnePaddedQuantConv2D if one_pad else lq.layers.QuantConv2D
        return layer(
            filters,
            kernel_size,
            strides=strides,
            padding="same",
            pad_values=1.0 if one_pad else 0.0,
            input_quantizer=input_q,
            kernel_quantizer=kernel_q,
            kernel_initializer=self.initializer(),
            kernel_constraint=self.kernel_constraint if kernel_q is not None else None,
            use_bias=False,
            name=name,
        )


def float_conv(filters, kernel_size, strides=1, initializer=he_normal, name=None):
    """Float conv; `initializer` is a factory (a fresh, independently random instance
    per layer: Keras warns that a reused unseeded instance repeats its values)."""
    return tf.keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer=initializer(),
        name=name,
    )


def binary_conv_block(x, spec: BinarySpec, filters, strides=1, relu=True):
    """Binary conv -> ReLU -> BN, the reference's order (LCE fuses the ReLU into the
    binary conv's output transform when it follows it directly)."""
    x = spec.conv(filters, 3, strides)(x)
    if relu:
        x = tf.keras.layers.ReLU()(x)
    return batch_norm()(x)


@tf.keras.utils.register_keras_serializable(package="reste_larq")
class LearnableBias(tf.keras.layers.Layer):
    """x + b with one learnable b per channel (zeros at start): ReActNet's shift, before
    the sign (RSign) and around the PReLU (RPReLU)."""

    def build(self, input_shape):
        self.bias = self.add_weight(
            name="bias", shape=(input_shape[-1],), initializer="zeros", trainable=True
        )

    def call(self, inputs):
        return inputs + tf.cast(self.bias, inputs.dtype)


def prelu():
    """PyTorch's nn.PReLU(channels): one slope per channel, 0.25 at start."""
    return tf.keras.layers.PReLU(
        alpha_initializer=tf.keras.initializers.Constant(0.25), shared_axes=[1, 2]
    )


def binary_unit(x, spec: BinarySpec, filters, strides, residual, relu=True):
    """One binary conv and its shortcut `residual`, as `spec.block` builds them:

    - reference: BN(ReLU(bconv(x))) + residual (`relu=False`: BN(bconv(x)) + residual)
    - prelu (BNN-tricks): PReLU(bconv(sign(BN(x))) + residual)
    - react (ReActNet): RPReLU(BN(bconv(RSign(x))) + residual), RSign(x) =
      sign(x + b), RPReLU(y) = PReLU(y + g) + z, b, g, z learnable per channel.

    The sign is the binary conv's input quantizer in each: every variant converts to
    LceBconv2d.
    """
    if spec.block == "reference":
        return tf.keras.layers.add([binary_conv_block(x, spec, filters, strides, relu), residual])
    if spec.block == "prelu":
        out = spec.conv(filters, 3, strides)(batch_norm()(x))
        return prelu()(tf.keras.layers.add([out, residual]))
    out = batch_norm()(spec.conv(filters, 3, strides)(LearnableBias()(x)))
    out = LearnableBias()(tf.keras.layers.add([out, residual]))
    return LearnableBias()(prelu()(out))


@tf.keras.utils.register_keras_serializable(package="reste_larq")
class ChannelPad(tf.keras.layers.Layer):
    """Zero-pads the channel axis to `filters` channels, split evenly on both sides."""

    def __init__(self, filters: int, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters

    def call(self, inputs):
        extra = self.filters - inputs.shape[-1]
        before = extra // 2
        return tf.pad(inputs, [[0, 0], [0, 0], [0, 0], [before, extra - before]])

    def compute_output_shape(self, input_shape):
        return tf.TensorShape([*input_shape[:-1], self.filters])

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


def shortcut_option_a(x, filters, strides):
    """He et al.'s parameter-free option A: subsample, then zero-pad the channels."""
    if strides != 1:
        x = tf.keras.layers.MaxPool2D(1, strides=strides)(x)  # x[:, ::s, ::s, :]
    if x.shape[-1] != filters:
        x = ChannelPad(filters)(x)
    return x


def shortcut_conv(x, filters, strides, pool=False, initializer=he_normal, mode="reference"):
    """Float 1x1 conv + BN downsample (identity when shapes already match).

    mode "reference": a strided 1x1 conv -> BN, or with `pool` (Bi-Real Net) a 2x2
    average pool then a 1x1 conv -> BN. The BNN-tricks collection's variants, for
    stride 2: v1 1x1 conv -> BN -> 2x2 average pool (its recommended one); v2 2x2
    average pool -> 1x1 conv -> BN; v3 1x1 conv -> BN -> 3x3 average pool, stride 2,
    zero padding 1 counted in the mean (PyTorch's AvgPool2d default).
    """
    if x.shape[-1] == filters and strides == 1:
        return x
    if mode == "reference" or strides == 1:
        if pool and strides != 1:
            x = tf.keras.layers.AvgPool2D(strides, strides=strides, padding="same")(x)
            strides = 1
        x = float_conv(filters, 1, strides, initializer)(x)
        return batch_norm()(x)
    if mode == "v2":
        x = tf.keras.layers.AvgPool2D(2, strides=strides)(x)
    x = batch_norm()(float_conv(filters, 1, 1, initializer)(x))
    if mode == "v1":
        x = tf.keras.layers.AvgPool2D(2, strides=strides)(x)
    elif mode == "v3":
        x = tf.keras.layers.ZeroPadding2D(1)(x)
        x = tf.keras.layers.AvgPool2D(3, strides=strides)(x)
    return x


def classifier_head(x, num_classes, dense_initializer=torch_default, bn=True):
    """Global average pool -> BN -> float dense, logits out (as the reference)."""
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    if bn:
        x = batch_norm()(x)
    return tf.keras.layers.Dense(
        num_classes,
        kernel_initializer=dense_initializer(),
        name="logits",
    )(x)
