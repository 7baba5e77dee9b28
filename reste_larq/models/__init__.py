"""The model zoo: `available()` names, `build(name, ...)` returns an uncompiled Keras model.

```python
import larq as lq
from reste_larq import models

model = models.build("resnet20_1w1a", quantizer="reste")
lq.models.summary(model)
```
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
from typing import Callable

import tensorflow as tf

from reste_larq.errors import ConfigError
from reste_larq.models import cifar, imagenet
from reste_larq.models.blocks import (
    BLOCKS,
    DEFAULT_BN_MOMENTUM,
    DOWNSAMPLES,
    PADDINGS,
    BinarySpec,
    batch_norm_settings,
)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    factory: Callable
    family: str  # "cifar" | "imagenet"
    quantizer: str = "reste"
    a32: bool = False
    weight_scale: bool = True
    kernel_initializer: object = "he_normal"
    kernel_constraint: object = None
    blocks: bool = True  # takes `block` (the ResNet families)
    downsamples: bool = False  # takes `downsample` (float 1x1 conv shortcuts)

    @property
    def input_shape(self):
        return (32, 32, 3) if self.family == "cifar" else (224, 224, 3)

    @property
    def num_classes(self):
        return 10 if self.family == "cifar" else 1000


_MODELS = {
    "resnet20_1w1a": ModelInfo(cifar.resnet20_1w1a, "cifar"),
    "resnet20_bireal_1w1a": ModelInfo(cifar.resnet20_bireal_1w1a, "cifar"),
    # The reference initializes nothing in this net: PyTorch's default init everywhere,
    # binary convs included.
    "resnet18_1w1a": ModelInfo(
        cifar.resnet18_1w1a, "cifar", kernel_initializer="torch_default", downsamples=True
    ),
    "vgg_small_1w1a": ModelInfo(
        cifar.vgg_small_1w1a, "cifar", kernel_initializer="he_normal_fan_out", blocks=False
    ),
    # 1-bit weights, real activations by definition; its binarizer scales itself.
    "wrn20_10_1bit": ModelInfo(
        cifar.wrn20_10_1bit,
        "cifar",
        quantizer="wrn_sign",
        a32=True,
        weight_scale=False,
        kernel_initializer="he_normal_fan_out",
        blocks=False,
    ),
    "resnet18_1w1a_imagenet": ModelInfo(
        imagenet.resnet18_1w1a_imagenet, "imagenet", downsamples=True
    ),
    "resnet34_1w1a_imagenet": ModelInfo(
        imagenet.resnet34_1w1a_imagenet, "imagenet", downsamples=True
    ),
    # Bi-Real Net as published (and in larq_zoo): ApproxSign activations, magnitude-aware
    # weights (already scaled per channel), weights clipped to [-1, 1].
    "birealnet18": ModelInfo(
        imagenet.birealnet18,
        "imagenet",
        quantizer="bireal",
        weight_scale=False,
        kernel_initializer="glorot_normal",
        kernel_constraint="weight_clip",
        blocks=False,
    ),
    "birealnet34": ModelInfo(
        imagenet.birealnet34,
        "imagenet",
        quantizer="bireal",
        weight_scale=False,
        kernel_initializer="glorot_normal",
        kernel_constraint="weight_clip",
        blocks=False,
    ),
}


@contextlib.contextmanager
def _quiet_larq_constraint_warning():
    """Larq warns once per binary conv built without a kernel constraint; these models
    leave latent weights unclipped on purpose (as the ReSTE reference), so the warning
    would only repeat itself dozens of times per model."""
    logger = logging.getLogger("larq.layers_base")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def available(family: str | None = None) -> list[str]:
    """Model names, optionally only one family ("cifar" or "imagenet")."""
    return [n for n, info in _MODELS.items() if family in (None, info.family)]


def info(name: str) -> ModelInfo:
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(available())}")
    return _MODELS[name]


def build(
    name: str,
    *,
    quantizer: str | None = None,
    input_shape=None,
    num_classes: int | None = None,
    a32: bool | None = None,
    w32: bool = False,
    padding: str = "one",
    weight_scale: bool | None = None,
    sync_bn: bool = False,
    bn_momentum: float = DEFAULT_BN_MOMENTUM,
    block: str = "reference",
    downsample: str = "reference",
    **options,
) -> tf.keras.Model:
    """Build model `name` (uncompiled, logits out).

    quantizer: an estimator name (`reste_larq.quantizers.estimators()`) or "float";
        None takes the model's own (reste; bireal for Bi-Real Net; wrn_sign for WRN).
    a32: real activations (1W/32A); None takes the model's default (True for WRN only).
    w32: real weights with binary activations (32W/1A, ReActNet's first step; the
        stage before 1W1A in `train.multistage`). Not for a model whose default is a32.
    padding: "one" (default: LCE's fast bit-packed path) or "zero" (the reference).
    weight_scale: mean |w| kernel scaling; None takes the model's default.
    sync_bn: synchronized BatchNorm across replicas (for tf.distribute training).
    bn_momentum: Keras' BatchNorm momentum (0.9 = PyTorch's default 0.1).
    block: the unit around each binary conv of the ResNet families (`BLOCKS`):
        "reference" (ReSTE's), "prelu" (BNN-tricks), "react" (ReActNet's RSign/RPReLU).
    downsample: the float shortcut downsample of the ResNet-18/34 nets (`DOWNSAMPLES`):
        "reference" (strided 1x1 conv + BN) or BNN-tricks' "v1", "v2", "v3".

    Mixed precision: set Keras' global policy first
    (`tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")`); the model then
    computes in that dtype with float32 variables and float32 logits. The quantizers'
    math and their o / mu stay float32. `export.convert` converts a float32 twin.
    options: the factory's own keyword options (e.g. `width` for wrn20_10_1bit).
    """
    model_info = info(name)
    allowed = [
        p
        for p in inspect.signature(model_info.factory).parameters
        if p not in ("inputs", "spec", "num_classes")
    ]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for {name}; it accepts "
            f"{', '.join(allowed) if allowed else 'no extra options'} besides quantizer, "
            f"input_shape, num_classes, a32, padding ({'|'.join(PADDINGS)}), weight_scale"
        )
    if block not in BLOCKS:
        raise ConfigError(f"block must be one of {', '.join(BLOCKS)} (got {block!r})")
    if block != "reference" and not model_info.blocks:
        raise ConfigError(
            f"{name} has its own block; block={block!r} is for "
            + ", ".join(n for n, i in _MODELS.items() if i.blocks)
        )
    if downsample not in DOWNSAMPLES:
        raise ConfigError(
            f"downsample must be one of {', '.join(DOWNSAMPLES)} (got {downsample!r})"
        )
    if downsample != "reference" and not model_info.downsamples:
        raise ConfigError(
            f"{name} has no 1x1 conv downsample; downsample={downsample!r} is for "
            + ", ".join(n for n, i in _MODELS.items() if i.downsamples)
        )
    spec = BinarySpec(
        block=block,
        downsample=downsample,
        quantizer=model_info.quantizer if quantizer is None else quantizer,
        a32=model_info.a32 if a32 is None else bool(a32),
        w32=bool(w32),
        padding=padding,
        weight_scale=model_info.weight_scale if weight_scale is None else bool(weight_scale),
        kernel_initializer=model_info.kernel_initializer,
        kernel_constraint=model_info.kernel_constraint,
    )
    num_classes = num_classes or model_info.num_classes
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2 (got {num_classes})")
    inputs = tf.keras.Input(tuple(input_shape or model_info.input_shape), name="image")
    with batch_norm_settings(sync_bn, bn_momentum), _quiet_larq_constraint_warning():
        outputs = model_info.factory(inputs, spec, num_classes, **options)
    if tf.keras.mixed_precision.global_policy().compute_dtype != "float32":
        # Mixed precision: logits (and so the softmax and loss) in float32, as Keras'
        # mixed-precision guide asks; a linear layer, no weights.
        outputs = tf.keras.layers.Activation("linear", dtype="float32", name="logits_float32")(
            outputs
        )
    return tf.keras.Model(inputs, outputs, name=name)
