"""Small-image (CIFAR-size) binary networks of the ReSTE reference and McDonnell's
1-bit Wide ResNet. Inputs of any small size work (32x32x3, 28x28x1, ...)."""

from __future__ import annotations

import functools

import tensorflow as tf

from reste_larq.models.blocks import (
    BinarySpec,
    ChannelPad,
    batch_norm,
    binary_conv_block,
    binary_unit,
    classifier_head,
    float_conv,
    he_normal,
    shortcut_conv,
    shortcut_option_a,
    torch_default,
)

_he_normal_fan_out = functools.partial(he_normal, "fan_out")


def _stem(inputs, filters, initializer=he_normal):
    """Float 3x3 conv -> ReLU -> BN (the reference's order for 1W1A nets)."""
    x = float_conv(filters, 3, initializer=initializer)(inputs)
    x = tf.keras.layers.ReLU()(x)
    return batch_norm()(x)


def _resnet(inputs, spec, num_classes, stages, shortcut, bireal, initializer=he_normal):
    """ResNet body over (filters, blocks, stride) stages.

    Standard block: BN(ReLU(bconv)) -> BN(ReLU(bconv)) + shortcut(x).
    Bi-Real block (`bireal`): a shortcut around every binary conv. The PReLU and ReAct
    blocks (`spec.block`, see `binary_unit`) also put one around every binary conv.
    """
    x = _stem(inputs, stages[0][0], initializer)
    for filters, blocks, first_stride in stages:
        for i in range(blocks):
            strides = first_stride if i == 0 else 1
            residual = shortcut(x, filters, strides)
            if bireal or spec.block != "reference":
                x = binary_unit(x, spec, filters, strides, residual)
                x = binary_unit(x, spec, filters, 1, x)
            else:
                out = binary_conv_block(x, spec, filters, strides)
                out = binary_conv_block(out, spec, filters)
                x = tf.keras.layers.add([out, residual])
    return classifier_head(x, num_classes, dense_initializer=initializer)


def resnet20_1w1a(inputs, spec: BinarySpec, num_classes: int):
    """ResNet-20 (0.27M params): 16/32/64 x 3 blocks, option-A shortcuts."""
    stages = [(16, 3, 1), (32, 3, 2), (64, 3, 2)]
    return _resnet(inputs, spec, num_classes, stages, shortcut_option_a, False, he_normal)


def resnet20_bireal_1w1a(inputs, spec: BinarySpec, num_classes: int):
    """ResNet-20 with a Bi-Real shortcut around every binary conv."""
    stages = [(16, 3, 1), (32, 3, 2), (64, 3, 2)]
    return _resnet(inputs, spec, num_classes, stages, shortcut_option_a, True, he_normal)


def resnet18_1w1a(inputs, spec: BinarySpec, num_classes: int):
    """CIFAR ResNet-18 (11.2M params): 64..512 x 2 blocks, float 1x1 conv + BN
    downsample. The reference keeps PyTorch's default init for this net."""

    def shortcut(x, filters, strides):
        return shortcut_conv(x, filters, strides, initializer=torch_default, mode=spec.downsample)

    stages = [(64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)]
    return _resnet(inputs, spec, num_classes, stages, shortcut, False, torch_default)


def vgg_small_1w1a(inputs, spec: BinarySpec, num_classes: int):
    """VGG-small: float conv 128, binary 128 [pool], 256, 256 [pool], 512, 512 [pool];
    conv -> ReLU -> BN, max-pool after BN; float dense head. Init as the reference:
    N(0, 2 / (k*k*out)) convs, N(0, 0.01) dense."""
    x = _stem(inputs, 128, _he_normal_fan_out)
    for filters, pool in [(128, True), (256, False), (256, True), (512, False), (512, True)]:
        x = binary_conv_block(x, spec, filters)
        if pool:
            x = tf.keras.layers.MaxPool2D(2, strides=2)(x)
    x = tf.keras.layers.Flatten()(x)
    return tf.keras.layers.Dense(
        num_classes,
        kernel_initializer=tf.keras.initializers.RandomNormal(stddev=0.01),
        name="logits",
    )(x)


def wrn20_10_1bit(inputs, spec: BinarySpec, num_classes: int, width: int = 10):
    """McDonnell's 1-bit Wide ResNet-20-10 (ICLR 2018), as in Zagoruyko's port.

    Pre-activation blocks BN -> ReLU -> conv with BN *without* affine parameters;
    downsampling by a stride-2 conv in the residual branch and 3x3 average pool +
    zero channels on the shortcut; float first conv (16*width) and float 1x1 conv
    head -> BN -> global average pool. With binary activations (a32=False) the ReLU
    before each binary conv is dropped (sign(ReLU(x)) would be constant +1).
    """
    widths = [16 * width, 32 * width, 64 * width]
    relu = spec.a32 or not spec.binary

    def preact(x):
        x = batch_norm(affine=False)(x)
        return tf.keras.layers.ReLU()(x) if relu else x

    x = float_conv(widths[0], 3, initializer=_he_normal_fan_out)(inputs)
    for stage, filters in enumerate(widths):
        for i in range(3):
            strides = 2 if (stage > 0 and i == 0) else 1
            h = spec.conv(filters, 3, strides)(preact(x))
            h = spec.conv(filters, 3)(preact(h))
            if strides == 2:
                x = tf.keras.layers.AvgPool2D(3, strides=2, padding="same")(x)
                x = ChannelPad(filters)(x)
            x = tf.keras.layers.add([x, h])
    x = tf.keras.layers.ReLU()(batch_norm(affine=False)(x))
    x = float_conv(num_classes, 1, initializer=_he_normal_fan_out)(x)
    x = batch_norm()(x)
    return tf.keras.layers.GlobalAveragePooling2D(name="logits")(x)
