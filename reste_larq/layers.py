r"""Layers: Larq's `QuantConv2D` with a cheaper one-padded convolution for training.

A binary conv pads its ±1 input with +1 (`pad_values=1`, LCE's fast path: 0 is not a
binary value). Larq implements it as `tf.pad(x, 1)` and a "valid" convolution: a full
copy of every activation per layer, a `Slice` of the same size in the backward pass, and
an input gradient computed for the padded border as well. Measured by
`benchmarks/profile_step.py` on resnet20_1w1a (batch 128, TF 2.19.1, 2 cores): those
three were ~57 of the 74 ms of op time per step by which ReSTE trailed its float twin.

Padding is linear. Shift the input by the pad value c: the padded copy of x - c has 0
on its border, which is what a zero-padded ("same") convolution reads, and the shift
comes back as a constant, c times the sum of every tap of the kernel, at every output:

\\[
\mathrm{conv}_{valid}(\mathrm{pad}_c(x), k) = \mathrm{conv}_{same}(x - c, k)
  + c \sum_{i, j, l} k_{i j l}
\\]

The first term is a zero-padded convolution (oneDNN pads inside the kernel, nothing is
copied); the second is one bias per filter, which TensorFlow fuses into the convolution
(`_FusedConv2D`), with `BiasAddGrad` as its gradient. The subtraction costs no pass of
its own for the quantizers this library fuses: `reste_larq.quantizers.quantize_shifted`
computes sign(x) - c in the quantizer's forward kernel (ReSTE, BNN++, ReCU and BiPer's
activations, Larq's `ste_sign`); any other input quantizer runs as itself, then the
shift is subtracted.

While training, `OnePaddedQuantConv2D` computes this form. At inference
(`training=False`, what `reste_larq.export.convert` traces) it is Larq's layer unchanged,
the graph LCE turns into one `LceBconv2d` with one-padding. The two forms add the same
products in another order: outputs and gradients agree to float rounding (a few ulps),
not bit for bit. Measured by `benchmarks/train_throughput.py` (docs/results.md,
"Training cost of the estimators").

```python
layer = OnePaddedQuantConv2D(64, 3, padding="same", pad_values=1.0,
                             input_quantizer="reste", kernel_quantizer="reste")
```
"""

from __future__ import annotations

import larq as lq
import tensorflow as tf
from larq import utils as lq_utils

from reste_larq.quantizers import quantize_shifted


@lq_utils.register_keras_custom_object
class OnePaddedQuantConv2D(lq.layers.QuantConv2D):
    """`lq.layers.QuantConv2D` (same arguments, weights and config) whose constant
    padding costs no padded copy while training (see the module docstring).

    `decompose_padding = False` (on the class or a layer, before the first call) trains
    with Larq's padded copy instead, e.g. to measure the difference."""

    decompose_padding = True

    def _decomposed(self, training) -> bool:
        # Only where the identity holds as written below; everything else is Larq's path.
        return (
            self.decompose_padding
            and training is True
            and not self._is_native_padding
            and not tf.is_tensor(self.pad_values)
            and not self.use_bias
            and self.activation in (None, tf.keras.activations.linear)
            and self.groups == 1
            and self.data_format == "channels_last"
        )

    def call(self, inputs, training=None):
        if not self._decomposed(training):
            return super().call(inputs)
        shift = float(self.pad_values)
        x = quantize_shifted(self.input_quantizer, inputs, shift)
        with lq.context.quantized_scope(True):
            kernel = tf.convert_to_tensor(self.kernel)  # the kernel quantizer runs once
        outputs = tf.nn.convolution(
            x,
            kernel,
            strides=list(self.strides),
            padding="SAME",
            dilations=list(self.dilation_rate),
            data_format="NHWC",
        )
        # float32 sum: under mixed bfloat16 a sum of hundreds of taps would lose bits
        taps = tf.reduce_sum(tf.cast(kernel, tf.float32), axis=[0, 1, 2])
        return _bias_add(outputs, shift * taps)


@tf.function(jit_compile=True)
def _batch_sums(dy):
    return tf.reduce_sum(tf.cast(dy, tf.float32), axis=[0, 1, 2])


def _bias_add(outputs, bias):
    """outputs + bias (float32, one per channel). In float32 it is `tf.nn.bias_add`,
    which TensorFlow fuses into the convolution before it. In half precision the bias's
    gradient sums the output gradient in float32: with TensorFlow's bfloat16
    `BiasAddGrad` the kernel gradient, in which this sum cancels much of the shifted
    convolution's, fell outside the 2 % (of its largest value) of Larq's layer that
    tests/test_layers.py allows in bfloat16."""
    if outputs.dtype == tf.float32:
        return tf.nn.bias_add(outputs, bias)

    @tf.custom_gradient
    def add(outputs, bias):
        def grad(dy):
            return dy, _batch_sums(dy)

        return tf.nn.bias_add(outputs, tf.cast(bias, outputs.dtype)), grad

    return add(outputs, bias)
