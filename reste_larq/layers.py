r"""Layers: Larq's `QuantConv2D` with a cheaper one-padded convolution for training.

A binary conv pads its ±1 input with +1 (`pad_values=1`, LCE's fast path: 0 is not a
binary value). Larq implements it as `tf.pad(x, 1)` and a "valid" convolution: a full
copy of every activation per layer, a `Slice` of the same size in the backward pass, and
an input gradient computed for the padded border as well. Measured by
`benchmarks/profile_step.py` on resnet20_1w1a (batch 128, TF 2.19.1, 2 cores): those
three were ~57 of the 74 ms of op time per step by which ReSTE trailed its float twin.

Padding is linear, so with B the padded border of an all-zero image (c on the border,
0 inside):

\\[
\mathrm{conv}_{valid}(\mathrm{pad}_c(x), k) = \mathrm{conv}_{same}(x, k)
  + \mathrm{conv}_{valid}(B, k)
\\]

The first term is a zero-padded convolution (oneDNN pads inside the kernel, nothing is
copied). The second does not depend on the batch, and B holds the same c in every
channel, so it is nonzero only on the output's border rows and columns, where it is a
small matmul: `taps @ sum over input channels of k` (`border_taps`). Its gradient needs
the batch sum of the output gradient on those strips alone (`_border_sums`, one XLA
reduction), not a sum over the whole output.

While training, `OnePaddedQuantConv2D` computes this form. At inference
(`training=False`, what `reste_larq.export.convert` traces) it is Larq's layer unchanged,
the graph LCE turns into one `LceBconv2d` with one-padding. The two forms add the same
products in another order: outputs and gradients agree to float rounding (a few ulps),
not bit for bit. `python benchmarks/train_throughput.py --estimators reste
reste+padcopy float` (resnet20_1w1a, batch 128, 5 interleaved rounds, TF 2.19.1, 2
cores): reste 550.5 img/s with this layer, 485.4 with Larq's padded copy, float twin
689.2.

```python
layer = OnePaddedQuantConv2D(64, 3, padding="same", pad_values=1.0,
                             input_quantizer="reste", kernel_quantizer="reste")
```
"""

from __future__ import annotations

import larq as lq
import numpy as np
import tensorflow as tf
from larq import utils as lq_utils

from reste_larq import native


def _run_lengths(touch):
    """(leading, trailing) counts of True in a 1-D mask that is True only at its ends."""
    lead = int(np.argmin(touch)) if not touch.all() else len(touch)
    trail = int(np.argmin(touch[::-1])) if not touch.all() else 0
    assert touch[:lead].all() and touch[len(touch) - trail :].all()
    assert not touch[lead : len(touch) - trail].any()
    return lead, trail


def border_taps(input_hw, kernel_hw, strides, dilations, padding, value):
    """The border of a constant-padded conv's output, as numpy arrays.

    Returns (strips, positions, taps, (ho, wo)): strips = (top, bottom, left, right), the
    output rows and columns that read any padding (a 'same' conv's border); positions
    are their output positions (flattened h * wo) in strip order (the top rows, the
    bottom rows, then the left and right columns between them); `taps[n, i * kw + j]` is
    the pad value that tap (i, j) of `positions[n]` reads, 0 where it reads the image."""
    (h, w), (kh, kw) = input_hw, kernel_hw
    (top, bottom), (left, right) = padding
    ho = (h + top + bottom - (kh - 1) * dilations[0] - 1) // strides[0] + 1
    wo = (w + left + right - (kw - 1) * dilations[1] - 1) // strides[1] + 1
    rows = np.arange(ho)[:, None] * strides[0] + np.arange(kh)[None, :] * dilations[0] - top
    cols = np.arange(wo)[:, None] * strides[1] + np.arange(kw)[None, :] * dilations[1] - left
    outside_r = (rows < 0) | (rows >= h)  # [ho, kh]
    outside_c = (cols < 0) | (cols >= w)  # [wo, kw]
    rt, rb = _run_lengths(outside_r.any(axis=1))
    cl, cr = _run_lengths(outside_c.any(axis=1))
    grid = np.arange(ho * wo).reshape(ho, wo)
    middle = grid[rt : ho - rb]
    positions = np.concatenate(
        [
            grid[:rt].ravel(),
            grid[ho - rb :].ravel(),
            middle[:, :cl].ravel(),
            middle[:, wo - cr :].ravel(),
        ]
    ).astype(np.int64)
    outside = outside_r[:, None, :, None] | outside_c[None, :, None, :]  # [ho, wo, kh, kw]
    taps = outside.reshape(ho * wo, kh * kw)[positions].astype(np.float32) * value
    return (rt, rb, cl, cr), positions, taps, (ho, wo)


@lq_utils.register_keras_custom_object
class OnePaddedQuantConv2D(lq.layers.QuantConv2D):
    """`lq.layers.QuantConv2D` (same arguments, weights and config) whose constant
    padding costs no padded copy while training (see the module docstring).

    `decompose_padding = False` (on the class or a layer, before the first call) trains
    with Larq's padded copy instead, e.g. to measure the difference;
    `add_border_in_place = False` adds the border term with TensorFlow's scatter and add
    where the native `AddAtBorder` would be used (the same values)."""

    decompose_padding = True
    add_border_in_place = True

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
        if not self._decomposed(training) or not inputs.shape[1:].is_fully_defined():
            return super().call(inputs)
        x = self.input_quantizer(inputs) if self.input_quantizer else inputs
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
        padding = [tuple(p) for p in self._get_padding_same(x)[1:3]]
        strips, positions, taps, (ho, wo) = border_taps(
            x.shape[1:3],
            self.kernel_size,
            self.strides,
            self.dilation_rate,
            padding,
            float(self.pad_values),
        )
        if not len(positions):
            return outputs
        # The border term conv_valid(B, k): B is the same value c in every channel, so
        # each border output is taps @ (k summed over input channels).
        summed = tf.reshape(tf.reduce_sum(kernel, axis=2), [-1, self.filters])
        border = tf.matmul(tf.constant(taps, kernel.dtype), summed)  # [positions, filters]
        return _add_at_border(outputs, border, positions, strips, self.add_border_in_place)


def _border_sums(dy, strips):
    """dy summed over the batch at the border strips: the native kernel where it loaded
    (no XLA launch: reste_larq.native), else the XLA function."""
    kernels = native.ops_for(dy)
    if kernels is None:
        return _border_sums_xla(dy, strips)
    rt, rb, cl, cr = (int(v) for v in strips)
    return kernels.border_sums(dy, rt=rt, rb=rb, cl=cl, cr=cr)


@tf.function(jit_compile=True)
def _border_sums_xla(dy, strips):
    # XLA reads the border strips inside the reduction; as TensorFlow ops, the strided
    # slices copied them first and cost as much as the sum they saved.
    rt, rb, cl, cr = strips
    _, ho, wo, filters = dy.shape
    middle = dy[:, rt : ho - rb]
    parts = [dy[:, :rt], dy[:, ho - rb :], middle[:, :, :cl], middle[:, :, wo - cr :]]
    # float32 sums: a batch of bfloat16 gradients summed in bfloat16 would lose bits
    sums = [tf.reshape(tf.reduce_sum(tf.cast(p, tf.float32), 0), [-1, filters]) for p in parts]
    return tf.cast(tf.concat(sums, axis=0), dy.dtype)


def _add_at_border(outputs, values, positions, strips, in_place=True):
    """outputs + values scattered to the border `positions` of every image: the native
    `AddAtBorder` where the kernels loaded (it adds in place, a pass over the border
    strips, where a scatter and a broadcast add make a full pass over the output), else
    TensorFlow's ops. The gradient for `values` sums the batch over the border strips
    only (`_border_sums`): Keras' broadcast add would sum the whole output over the
    batch, a full pass per layer."""
    _, ho, wo, filters = outputs.shape
    kernels = native.ops_for(outputs, values) if in_place else None
    rt, rb, cl, cr = (int(v) for v in strips)

    @tf.custom_gradient
    def add(outputs, values):
        if kernels is not None:
            # in the conv's output buffer, only the border strips touched (native)
            result = kernels.add_at_border(outputs, values, rt=rt, rb=rb, cl=cl, cr=cr)
        else:
            dense = tf.scatter_nd(positions[:, None], values, [ho * wo, filters])
            result = outputs + tf.reshape(dense, [1, ho, wo, filters])

        def grad(dy):
            return dy, _border_sums(dy, strips)

        return result, grad

    return add(outputs, values)
