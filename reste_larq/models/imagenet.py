"""ImageNet-size binary networks: the ReSTE reference's ResNet-18/34 and Bi-Real Net.

Both put a shortcut around every binary conv; they differ in the stem, the ReLU after
the binary conv, the downsample and the quantizers (`BinarySpec`).
"""

from __future__ import annotations

import tensorflow as tf

from reste_larq.models.blocks import (
    BinarySpec,
    batch_norm,
    binary_unit,
    classifier_head,
    float_conv,
    he_normal,
    shortcut_conv,
)


def _per_conv_resnet(inputs, spec, num_classes, convs_per_stage, *, bireal_net):
    """Stem, then 4 stages (64..512) of binary convs each with its own shortcut.

    ReSTE nets: stem conv -> ReLU -> BN -> max-pool; unit BN(ReLU(bconv(x))) + x;
    downsample float 1x1 conv (stride 2) + BN; head avg-pool -> BN -> dense.
    Bi-Real Net: stem conv -> BN -> max-pool; unit BN(bconv(x)) + x; downsample
    avg-pool 2x2 + float 1x1 conv + BN; head avg-pool -> dense.
    """
    initializer = spec.initializer if bireal_net else he_normal
    x = float_conv(64, 7, strides=2, initializer=initializer)(inputs)
    if not bireal_net:
        x = tf.keras.layers.ReLU()(x)
    x = batch_norm()(x)
    x = tf.keras.layers.MaxPool2D(3, strides=2, padding="same")(x)
    for stage, convs in enumerate(convs_per_stage):
        filters = 64 * 2**stage
        for i in range(convs):
            strides = 2 if (stage > 0 and i == 0) else 1
            residual = shortcut_conv(
                x, filters, strides, bireal_net, initializer, mode=spec.downsample
            )
            x = binary_unit(x, spec, filters, strides, residual, relu=not bireal_net)
    return classifier_head(x, num_classes, bn=not bireal_net)


def resnet18_1w1a_imagenet(inputs, spec: BinarySpec, num_classes: int):
    """ReSTE's ImageNet ResNet-18 (2 basic blocks = 4 binary convs per stage)."""
    return _per_conv_resnet(inputs, spec, num_classes, [4, 4, 4, 4], bireal_net=False)


def resnet34_1w1a_imagenet(inputs, spec: BinarySpec, num_classes: int):
    """ReSTE's ImageNet ResNet-34 ([3, 4, 6, 3] basic blocks)."""
    return _per_conv_resnet(inputs, spec, num_classes, [6, 8, 12, 6], bireal_net=False)


def birealnet18(inputs, spec: BinarySpec, num_classes: int):
    """Bi-Real Net-18 (Liu et al., ECCV 2018); same graph as larq_zoo's BiRealNet."""
    return _per_conv_resnet(inputs, spec, num_classes, [4, 4, 4, 4], bireal_net=True)


def birealnet34(inputs, spec: BinarySpec, num_classes: int):
    """Bi-Real Net-34."""
    return _per_conv_resnet(inputs, spec, num_classes, [6, 8, 12, 6], bireal_net=True)
