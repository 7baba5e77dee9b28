r"""Binary quantizers (gradient estimators) for Larq layers.

Every quantizer here has a binary forward pass at inference, `larq.math.sign`
(sign(0) = +1, the form Larq Compute Engine converts to a binary convolution),
and differs only in the pseudo-gradient used while training.

| name (aliases)               | forward (training)        | backward                          |
| ---------------------------- | ------------------------- | --------------------------------- |
| `reste` (`ReSTE`)            | sign                      | rectified power, see `ReSTE`      |
| `bnnpp` (`bnn++`, `BNNpp`)   | SignSwish SS_mu           | exact derivative of SS_mu         |
| `binary_connect`             | sign                      | identity                          |
| `wrn_sign`                   | sqrt(2/fan_in) * sign     | identity                          |
| `ste` (`bnn`), `ste_sign` (Larq) | sign                  | 1 on abs(x) <= 1 (hard tanh)      |
| `bnn+` (`bnn_plus`)          | sign                      | SignSwish derivative              |
| `approx_sign` (Larq)         | sign                      | 2 - 2 abs(x) on abs(x) <= 1       |
| `magnitude_aware_sign` (Larq)| mean abs(w) per channel * sign | STE                          |
| `recu` (`ReCU`), weights     | sign(clamp(standardized w)) | identity, through the clamp     |
| `recu_activation`            | sign (normalized per sample) | 2 - 2 abs(x) on abs(x) <= 1    |
| `biper` (`BiPer`), weights   | sign(sin(omega w))        | omega cos(omega w)                |
| `biper_stage1`, weights      | sin(omega w) (real)       | omega cos(omega w)                |

```python
import larq as lq
import reste_larq  # registers the names

layer = lq.layers.QuantConv2D(
    64, 3, input_quantizer="reste", kernel_quantizer="reste", use_bias=False
)
```

An *estimator* (`ESTIMATORS`, `estimator_quantizers`) names the pair of quantizers a
model uses for its activations and its weights; most estimators use the same
quantizer for both, Bi-Real Net and the 1-bit Wide ResNet do not.
"""

from __future__ import annotations

import functools
import math

import larq as lq
import numpy as np
import tensorflow as tf
from larq import utils as lq_utils
from larq.quantizers import _BaseQuantizer, _clipped_gradient

from reste_larq import native
from reste_larq.errors import ConfigError

__all__ = [
    "ESTIMATORS",
    "BinaryConnect",
    "BiPer",
    "BiPerStage1",
    "ReCU",
    "ReCUActivation",
    "BNNpp",
    "BNNPlus",
    "FusedSteSign",
    "MeanAbsScaled",
    "ReSTE",
    "WrnSign",
    "binary_connect_sign",
    "binary_sign",
    "biper_regularizer",
    "biper_weight",
    "bnnpp_sign",
    "estimator_quantizers",
    "estimators",
    "fused_ste_sign",
    "reste_equivalent_forward",
    "reste_gradient",
    "recu_activation_sign",
    "recu_standardize",
    "recu_tau_at",
    "recu_weight",
    "reste_sign",
    "signswish",
    "signswish_gradient",
    "wrn_sign",
]

# SignSwish saturates: beyond |mu*x| = 50 its derivative is below 1e-19 and its value is
# +-1 to float precision. Clipping there keeps cosh/exp from overflowing to inf/inf.
_SIGNSWISH_CLIP = 50.0


def _compute_dtype(x):
    """Half-precision inputs are computed in float32 so powers and exps stay finite."""
    return tf.float32 if x.dtype in (tf.float16, tf.bfloat16) else x.dtype


# --------------------------------------------------------------------------- ReSTE
def reste_gradient(x, o, t=1.5, interval=0.1):
    r"""The ReSTE pseudo-derivative d sign(x) / dx (Wu et al., ICCV 2023).

    \\[
    \frac{\partial q}{\partial x} = \begin{cases}
      \frac{1}{o} |x|^{\frac{1-o}{o}} & \text{interval} < |x| \le t \\
      \text{interval}^{1/o} / \text{interval} & |x| \le \text{interval} \\
      0 & |x| > t
    \end{cases}
    \\]

    The power function |x|^(1/o) has an infinite slope at 0 for o > 1; inside
    `interval` the secant slope from 0 to `interval` is used instead, so the
    gradient is finite everywhere, x = 0 included.
    """
    dtype = _compute_dtype(x)
    ax = tf.abs(tf.cast(x, dtype))
    o = tf.cast(o, dtype)
    exponent = (1.0 - o) / o
    # |x|^e as exp(e log|x|): tf.pow has no vectorized CPU kernel and was 2.5x slower
    # (benchmarks/estimator_kernels.py).
    # max(|x|, interval) gives interval^e on the inner region and keeps log finite.
    power = tf.exp(exponent * tf.math.log(tf.maximum(ax, interval)))
    slope = tf.where(ax <= interval, power, power / o)
    return tf.where(ax <= t, slope, tf.zeros_like(slope))


def _elementwise_xla(fn):
    """`fn` XLA-compiled, for elementwise functions whose leading arguments are tensors
    of one shape (then scalars), called on those tensors flattened to 1-D.

    XLA fuses an elementwise chain into one pass over memory. Flat, because XLA's CPU
    code for an NHWC tensor whose last axis is short (16 channels) vectorizes across the
    wrong axis, with masked gathers and scatters: the product of two 128x32x32x16
    tensors took 3.9 ms against TensorFlow's 1.5 ms, and 1.5 ms when flattened
    (`benchmarks/estimator_kernels.py`). Elementwise values do not depend on the shape.
    """
    compiled = tf.function(fn, jit_compile=True)

    @functools.wraps(fn)
    def call(*args):
        shape = tf.shape(args[0])
        flat = [tf.reshape(a, [-1]) if tf.is_tensor(a) and a.shape.rank else a for a in args]
        return tf.reshape(compiled(*flat), shape)

    call.compiled = compiled  # the XLA function itself (its shape as given)
    return call


@_elementwise_xla
def _reste_backward(x, dy, o, t, interval):
    # One fused pass over memory, bound by its exp and log: 3.3 ms against a `Mul`'s 1.4
    # on a 128x32x32x16 tensor here (7.1 ms as unfused TensorFlow ops).
    return dy * tf.cast(reste_gradient(x, o, t, interval), dy.dtype)


def _reste_dx(x, dy, o, t, interval):
    """dy * reste_gradient(x, o): the native kernel where it loaded (one pass, no XLA
    launch: reste_larq.native), else the XLA kernel."""
    kernels = native.ops_for(x, dy)
    if kernels is None:
        return _reste_backward(x, dy, o, t, interval)
    return kernels.reste_grad(x, dy, tf.cast(o, tf.float32), t=t, interval=interval)


def binary_sign(x, training=None):
    """`larq.math.sign(x)`; in a training step (`training=True`) one native pass where
    the kernels loaded (`reste_larq.native`), the same values, where Larq's form makes
    three passes over memory. Graphs traced with training False or None, which LCE
    converts, keep Larq's ops, the pattern LCE fuses into its binary convolution."""
    if training is True:
        kernels = native.ops_for(x)
        if kernels is not None:
            return kernels.binary_sign(x)
    return lq.math.sign(x)


def reste_sign(x, o=1.0, t=1.5, interval=0.1, training=None):
    """sign(x) forward (`larq.math.sign`, see `binary_sign` for `training`), ReSTE
    backward (`reste_gradient`)."""
    o = tf.convert_to_tensor(o, tf.float32)

    @tf.custom_gradient
    def _call(x):
        def grad(dy):
            return _reste_dx(x, dy, o, float(t), float(interval))

        return binary_sign(x, training), grad

    return _call(x)


def reste_equivalent_forward(x, o):
    r"""The function ReSTE's backward is the derivative of: sign(x) * |x|^(1/o).

    The ReSTE paper measures the *estimating error* as the distance between this
    and sign(x); o = 1 is the identity (plain STE), o -> inf approaches sign.
    """
    o = tf.cast(o, x.dtype)
    return lq.math.sign(x) * tf.pow(tf.abs(x), 1.0 / o)


# --------------------------------------------------------------------------- BNN++
def signswish(x, mu):
    r"""SignSwish SS_mu(x) = 2 sigmoid(mu x) (1 + mu x (1 - sigmoid(mu x))) - 1."""
    dtype = _compute_dtype(x)
    z = tf.clip_by_value(tf.cast(mu, dtype) * tf.cast(x, dtype), -_SIGNSWISH_CLIP, _SIGNSWISH_CLIP)
    # 1 - sigmoid(z) is computed as sigmoid(-z): exact where sigmoid(z) rounds to 1.
    return tf.cast(2.0 * tf.sigmoid(z) * (1.0 + z * tf.sigmoid(-z)) - 1.0, x.dtype)


def signswish_gradient(x, mu):
    r"""Exact derivative of SignSwish: mu (2 - mu x tanh(mu x / 2)) / (1 + cosh(mu x)).

    Computed in the equivalent form 2 mu s(z) s(-z) (2 + z (s(-z) - s(z))) with
    z = mu x and s the sigmoid, which cannot overflow (cosh(z) does for |z| > 89 in
    float32, giving inf / inf).
    """
    dtype = _compute_dtype(x)
    mu = tf.cast(mu, dtype)
    z = mu * tf.cast(x, dtype)
    zc = tf.clip_by_value(z, -_SIGNSWISH_CLIP, _SIGNSWISH_CLIP)
    s, s_neg = tf.sigmoid(zc), tf.sigmoid(-zc)
    slope = 2.0 * mu * s * s_neg * (2.0 + zc * (s_neg - s))
    return tf.where(tf.abs(z) > _SIGNSWISH_CLIP, tf.zeros_like(slope), slope)


@_elementwise_xla
def _signswish_forward(x, mu):
    return signswish(x, mu)


@_elementwise_xla
def _signswish_backward(x, dy, mu):
    return dy * tf.cast(signswish_gradient(x, mu), dy.dtype)


def bnnpp_sign(x, mu=5.0, training=True):
    """BNN++: SignSwish forward and its exact derivative while training; sign at inference.

    Both passes are XLA-fused elementwise kernels (see `_reste_backward`)."""
    if not training:
        return lq.math.sign(x)
    mu = tf.convert_to_tensor(mu, tf.float32)

    @tf.custom_gradient
    def _call(x):
        def grad(dy):
            return _signswish_backward(x, dy, mu)

        return _signswish_forward(x, mu), grad

    return _call(x)


# ------------------------------------------------------------------------- the STE
# Below this many elements (a small kernel) an XLA launch costs more than it saves:
# per pass, 0.06 ms against 0.04 for Larq's four ops on a 3x3x16x16 kernel, 0.10
# against 0.11 on 3x3x64x64 (`benchmarks/estimator_kernels.py --from-memory 20`).
_XLA_MIN_ELEMENTS = 1 << 13


def _small(x):
    return x.shape.is_fully_defined() and x.shape.num_elements() < _XLA_MIN_ELEMENTS


@_elementwise_xla
def _ste_backward(x, dy, clip_value):
    # One pass over memory; Larq's form as TensorFlow ops (Abs, LessEqual, ZerosLike,
    # Select) makes four. On a 128x32x32x16 activation read from memory, as in a
    # backward pass: 1.19 ms against 2.98 (`benchmarks/estimator_kernels.py
    # --from-memory 20`). Larq's own function inside, so the two agree bit for bit.
    return _clipped_gradient(x, dy, clip_value)


def fused_ste_sign(x, clip_value=1.0, training=None):
    """`larq.quantizers.ste_sign` (sign forward, dy on |x| <= clip_value backward) with
    its backward in one pass: the native kernel where it loaded (`reste_larq.native`),
    else one XLA pass on activations and Larq's ops on small kernels. The same values,
    bit for bit. `training`: see `binary_sign`."""

    @tf.custom_gradient
    def _call(x):
        def grad(dy):
            if clip_value is None:
                return dy
            kernels = native.ops_for(x, dy)
            if kernels is not None:
                # one pass, no XLA launch (reste_larq.native); a select, as Larq's
                return kernels.ste_grad(x, dy, tf.convert_to_tensor(clip_value, x.dtype))
            if _small(x):
                return _clipped_gradient(x, dy, clip_value)
            return _ste_backward(x, dy, tf.cast(clip_value, x.dtype))

        return binary_sign(x, training), grad

    return _call(x)


# ------------------------------------------------------------- identity-backward signs
@tf.custom_gradient
def binary_connect_sign(x):
    """BinaryConnect (Courbariaux et al., 2015): sign forward, identity backward."""
    return lq.math.sign(x), lambda dy: dy


def wrn_sign(w):
    """1-bit Wide ResNet weights (McDonnell, ICLR 2018): sqrt(2 / fan_in) * sign(w).

    fan_in is the product of all but the last kernel dimension (k * k * c_in for a
    conv). The backward pass is the identity, as in the paper.
    """
    fan_in = int(np.prod(w.shape[:-1]))
    scale = math.sqrt(2.0 / fan_in)

    @tf.custom_gradient
    def _call(w):
        return scale * lq.math.sign(w), lambda dy: dy

    return _call(w)


# --------------------------------------------------------------------------- classes
def _check(condition, message):
    if not condition:
        raise ConfigError(message)


class _ScheduledSign(_BaseQuantizer):
    """A binary quantizer with one schedulable float (ReSTE's o, BNN++'s mu).

    The value lives in a non-trainable variable so a callback can change it between
    epochs without retracing. It is kept out of the layer's `weights`, like Larq's own
    quantizer state, so summaries and parameter counts see only the architecture, but
    it is tracked: SavedModel, TF checkpoints and `.weights.h5` files restore it, and
    `get_config` carries its current value for legacy full-model `.h5` files.
    """

    precision = 1
    schedule_name: str = ""

    def __init__(self, initial_value, **kwargs):
        super().__init__(**kwargs)
        # Unique per instance: a QuantConv2D holds two of these (input and kernel), and
        # weight names must not repeat inside one layer.
        self.schedule_variable = self.add_weight(
            name=f"{self.name}_{self.schedule_name}",
            shape=(),
            dtype=tf.float32,
            initializer=tf.keras.initializers.Constant(float(initial_value)),
            trainable=False,
            experimental_autocast=False,  # under mixed_float16, o = 1.58 must not round to 1.580
        )

    def _value(self):
        # A tensor, not the variable: tf.custom_gradient may not close over variables.
        return tf.convert_to_tensor(self.schedule_variable)


@lq_utils.register_alias("reste")
@lq_utils.register_keras_custom_object
class ReSTE(_ScheduledSign):
    r"""Rectified Straight-Through Estimator (Wu, Zheng, Liu, Zheng; ICCV 2023).

    Forward: \\(q(x) = \mathrm{sign}(x)\\) (+1 at 0). Backward: the derivative of the
    power function \\(\mathrm{sign}(x)|x|^{1/o}\\), rectified near 0 and clipped
    beyond t (see `reste_gradient`). o = 1 is the clipped STE; larger o lowers the
    estimating error and the gradient stability. The paper raises o from 1 to 3
    over training (`reste_larq.callbacks.EstimatorSchedule`).

    ```python
    q = ReSTE(o=1.0)
    lq.layers.QuantConv2D(64, 3, input_quantizer=q, kernel_quantizer="reste")
    ```

    # Arguments
        o: power, >= 1; schedulable (`quantizer.o = 2.0`, or the callback).
        t: clipping threshold, > 0: gradient is 0 where |x| > t.
        interval: in (0, t): width of the constant-slope region around 0.
        metrics: Larq metrics (`["flip_ratio"]`).
    """

    schedule_name = "o"

    def __init__(self, o: float = 1.0, t: float = 1.5, interval: float = 0.1, **kwargs):
        _check(float(o) >= 1.0, f"ReSTE: o must be >= 1 (got {o}); o = 1 is the STE.")
        _check(float(t) > 0.0, f"ReSTE: t must be > 0 (got {t}).")
        _check(
            0.0 < float(interval) < float(t),
            f"ReSTE: interval must be in (0, t) = (0, {t}) (got {interval}).",
        )
        self.t = float(t)
        self.interval = float(interval)
        super().__init__(o, **kwargs)

    @property
    def o(self) -> float:
        return float(self.schedule_variable.numpy())

    @o.setter
    def o(self, value: float):
        _check(float(value) >= 1.0, f"ReSTE: o must be >= 1 (got {value}).")
        self.schedule_variable.assign(float(value))

    def call(self, inputs, training=None):
        outputs = reste_sign(inputs, self._value(), self.t, self.interval, training=training)
        return super().call(outputs)

    def get_config(self):
        return {
            **super().get_config(),
            "o": self.o,
            "t": self.t,
            "interval": self.interval,
        }


@lq_utils.register_alias("ste")
@lq_utils.register_alias("bnn")
@lq_utils.register_keras_custom_object
class FusedSteSign(lq.quantizers.SteSign):
    r"""The straight-through estimator of BNN (Hubara et al., 2016), as Larq's `SteSign`
    with the backward pass fused (`fused_ste_sign`): the same values, bit for bit.

    \\[
    q(x) = \mathrm{sign}(x), \qquad
    \frac{\partial q}{\partial x} = \begin{cases}
      1 & |x| \le \text{clip\_value} \\
      0 & |x| > \text{clip\_value}
    \end{cases}
    \\]

    The estimators `ste` (activations and kernels), `bnnpp` and `wrn_sign`
    (activations) use it; "ste_sign" stays Larq's own class.

    ```python
    QuantConv2D(64, 3, input_quantizer="ste", kernel_quantizer="ste", use_bias=False)
    ```
    """

    def call(self, inputs, training=None):
        outputs = fused_ste_sign(inputs, clip_value=self.clip_value, training=training)
        return _BaseQuantizer.call(self, outputs)  # Larq's metrics, as SteSign.call


@lq_utils.register_alias("bnnpp")
@lq_utils.register_alias("bnn++")
@lq_utils.register_keras_custom_object
class BNNpp(_ScheduledSign):
    r"""BNN++ from ProxConnect++ (Lu, Yu, Li, Partovi Nia; NeurIPS 2023).

    While training the forward pass is SignSwish and the backward its exact
    derivative, so forward and backward are consistent:
    \\[
    SS_\mu(x) = 2\sigma(\mu x)\left(1 + \mu x (1 - \sigma(\mu x))\right) - 1,\quad
    SS_\mu'(x) = \frac{\mu (2 - \mu x \tanh(\mu x / 2))}{1 + \cosh(\mu x)}.
    \\]
    At inference (`training=False`, and so in every exported model) the forward is
    `larq.math.sign`, so the deployed network is truly binary and LCE converts it.
    As mu grows SS_mu approaches sign; `EstimatorSchedule` raises mu during training
    (default 20 -> 200, chosen for kernels; see `reste_larq.callbacks`).

    # Arguments
        mu: slope, > 0; schedulable like ReSTE's o.
    """

    schedule_name = "mu"

    def __init__(self, mu: float = 5.0, **kwargs):
        _check(float(mu) > 0.0, f"BNNpp: mu must be > 0 (got {mu}).")
        super().__init__(mu, **kwargs)

    @property
    def mu(self) -> float:
        return float(self.schedule_variable.numpy())

    @mu.setter
    def mu(self, value: float):
        _check(float(value) > 0.0, f"BNNpp: mu must be > 0 (got {value}).")
        self.schedule_variable.assign(float(value))

    def call(self, inputs, training=None):
        if training is None:
            training = tf.keras.backend.learning_phase()
        outputs = tf.__internal__.smart_cond.smart_cond(
            training,
            lambda: bnnpp_sign(inputs, self._value(), training=True),
            lambda: lq.math.sign(inputs),
        )
        return super().call(outputs)

    def get_config(self):
        return {**super().get_config(), "mu": self.mu}


def bnn_plus_sign(x, beta=5.0):
    """BNN+ (Darabi et al., 2018): sign forward, SignSwish derivative backward."""

    @tf.custom_gradient
    def _call(x):
        return lq.math.sign(x), lambda dy: _signswish_backward(x, dy, float(beta))

    return _call(x)


@lq_utils.register_alias("bnn+")
@lq_utils.register_alias("bnn_plus")
@lq_utils.register_keras_custom_object
class BNNPlus(_BaseQuantizer):
    r"""BNN+: \(q(x) = \mathrm{sign}(x)\), backward the SignSwish derivative
    \(\beta (2 - \beta x \tanh(\beta x / 2)) / (1 + \cosh(\beta x))\).

    The same estimator as Larq's `swish_sign`, computed in the overflow-safe form of
    `signswish_gradient`: Larq's evaluates inf / inf = NaN once beta * |x| overflows
    (|x| > 13107 in float16 at beta = 5). The forward is the sign, so unlike BNN++ the
    backward is not the derivative of the forward.
    """

    precision = 1

    def __init__(self, beta: float = 5.0, **kwargs):
        _check(float(beta) > 0.0, f"BNNPlus: beta must be > 0 (got {beta}).")
        self.beta = float(beta)
        super().__init__(**kwargs)

    def call(self, inputs):
        return super().call(bnn_plus_sign(inputs, self.beta))

    def get_config(self):
        return {**super().get_config(), "beta": self.beta}


@lq_utils.register_alias("binary_connect")
@lq_utils.register_keras_custom_object
class BinaryConnect(_BaseQuantizer):
    r"""BinaryConnect: \\(q(x) = \mathrm{sign}(x)\\), gradient passed unchanged."""

    precision = 1

    def call(self, inputs):
        return super().call(binary_connect_sign(inputs))


@lq_utils.register_alias("wrn_sign")
@lq_utils.register_keras_custom_object
class WrnSign(_BaseQuantizer):
    r"""1-bit Wide ResNet weight binarizer (McDonnell, ICLR 2018).

    \\(q(w) = \sqrt{2 / \text{fan\_in}}\ \mathrm{sign}(w)\\), identity backward. For
    kernels only: the constant scale is He-init's standard deviation, so a BN without
    affine parameters can follow.
    """

    precision = 1

    def call(self, inputs):
        return super().call(wrn_sign(inputs))


@lq_utils.register_alias("mean_abs_scaled")
@lq_utils.register_keras_custom_object
class MeanAbsScaled(_BaseQuantizer):
    r"""Scales a binary kernel quantizer by the layer's mean |w| (one scalar per layer).

    \\(q(w) = \overline{|w|}\ q_{\text{inner}}(w)\\), as in the ReSTE reference (the
    scale is not detached: its gradient reaches w). LCE still converts the conv to a
    binary one: the folded kernel is +-s with one positive scalar s.

    ```python
    QuantConv2D(64, 3, kernel_quantizer=MeanAbsScaled("reste"), ...)
    ```
    """

    def __init__(self, quantizer="reste", **kwargs):
        super().__init__(**kwargs)
        self.quantizer = lq.quantizers.get(quantizer)
        # BiPer's real-valued stage 1 too: its stage 2, from the same weights, is binary
        _check(
            getattr(self.quantizer, "precision", None) == 1 or isinstance(self.quantizer, BiPer),
            f"MeanAbsScaled wraps a binary quantizer; got {quantizer!r}.",
        )
        self.precision = self.quantizer.precision

    def call(self, inputs):
        # float32 mean: a float16 sum of |w| overflows long before any |w| does
        scale = tf.reduce_mean(tf.abs(tf.cast(inputs, tf.float32)))
        return super().call(tf.cast(scale, inputs.dtype) * self.quantizer(inputs))

    def get_config(self):
        return {
            **super().get_config(),
            "quantizer": lq.quantizers.serialize(self.quantizer),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["quantizer"] = lq.quantizers.get(config["quantizer"])
        return cls(**config)


# ------------------------------------------------------------------ ReCU and BiPer
# Both public codes (z-hXu/ReCU `imagenet/modules/binarized_modules.py`, edmav4/BiPer
# `cifar10/modules/binarized_modules.py`) binarize activations the same way; their
# convs also multiply the output by a learnable per-channel alpha, which the
# BatchNorm after every binary conv here absorbs (its gamma), so it is left out.
_RECU_EPS = 1e-5  # both codes: var + 1e-5


def _channel_axes(w):
    return list(range(len(w.shape) - 1))  # all but the output channels (Keras: last)


def _normalized(x, axes, eps=_RECU_EPS):
    r"""\(x/\sqrt{\mathrm{var}(x) + \epsilon}\) over `axes` (torch.var's unbiased
    variance), computed as \((x/m)/\sqrt{\mathrm{var}(x/m) + \epsilon/m^2}\), the same
    value for any m > 0: with m = max|x| (held constant, at least 1e-15) no square
    overflows, so values and gradients stay finite from 1e-30 to 1e30."""
    m = tf.stop_gradient(tf.maximum(tf.reduce_max(tf.abs(x), axes, keepdims=True), 1e-15))
    xs = x / m
    n = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), x.dtype)
    centered = xs - tf.reduce_mean(xs, axes, keepdims=True)
    var = tf.reduce_sum(tf.square(centered), axes, keepdims=True) / tf.maximum(n - 1.0, 1.0)
    return xs / tf.sqrt(var + eps / tf.square(m))


@tf.custom_gradient
def _identity_sign(x):
    return lq.math.sign(x), lambda dy: dy


def recu_standardize(w):
    r"""ReCU's balanced weights (`BinarizeConv2d.forward`, lines w0 and w1):
    \\(w_1 = 2\sqrt{2}\,(w - \bar w_c)/\sqrt{\mathrm{var}_c(w) + 10^{-5}}\\) per output
    channel c (unbiased variance), so |w1| has mean about 2 (Laplace scale b = 2)."""
    axes = _channel_axes(w)
    return (2.0 * math.sqrt(2.0)) * _normalized(w - tf.reduce_mean(w, axes, keepdims=True), axes)


def recu_weight(w, tau):
    r"""ReCU's weight binarization (Xu et al., ICCV 2021), as its code computes it:
    \\[
    Q_\tau = -\,\mathrm{mean}(|w_1|)\,\ln(2 - 2\tau)\ \text{(no gradient)},\quad
    w_2 = \mathrm{clamp}(w_1, -Q_\tau, Q_\tau),\quad q(w) = \mathrm{sign}(w_2),
    \\]
    with `recu_standardize`'s w1 and the identity as sign's backward: the gradient
    reaches w through the clamp (0 beyond \\(\pm Q_\tau\\), the "rectified" dead
    weights revived) and through the standardization. Q_tau is the tau-quantile of
    |w1| if w1 is Laplace. The forward is sign(w - mean_c(w)), +-1 (LCE: binary).
    """
    dtype = _compute_dtype(w)
    w1 = recu_standardize(tf.cast(w, dtype))
    tau = tf.cast(tau, dtype)
    q = tf.stop_gradient(-tf.reduce_mean(tf.abs(w1)) * tf.math.log(2.0 - 2.0 * tau))
    return tf.cast(_identity_sign(tf.clip_by_value(w1, -q, q)), w.dtype)


def recu_activation_sign(x):
    r"""The activation binarization of the ReCU and BiPer codes while training:
    \\(a_0 = a/\sqrt{\mathrm{var}(a) + 10^{-5}}\\) per sample (unbiased, over H, W, C),
    forward sign(a0), backward \\(\max(0, 2 - 2|a_0|)\\) (Bi-Real's ApproxSign) times
    dy, and on through the normalization. sign(a0) = sign(a): at inference both codes
    skip the normalization, as `ReCUActivation` does."""
    dtype = _compute_dtype(x)
    a = tf.cast(x, dtype)
    a0 = _normalized(a, list(range(1, len(a.shape))))

    @tf.custom_gradient
    def _sign(a0):
        def grad(dy):
            return dy * tf.maximum(0.0, 2.0 - 2.0 * tf.abs(a0))

        # sign(a), which sign(a0) is, also where a0 underflows to 0 (tiny negative a)
        return lq.math.sign(a), grad

    return tf.cast(_sign(a0), x.dtype)


def _training(training):
    return tf.keras.backend.learning_phase() if training is None else training


@lq_utils.register_alias("recu_activation")
@lq_utils.register_keras_custom_object
class ReCUActivation(_BaseQuantizer):
    r"""Activations of ReCU and BiPer: sign, with per-sample normalization and the
    ApproxSign backward while training (`recu_activation_sign`); `larq.math.sign` at
    inference, the same values, which LCE converts.

    ```python
    QuantConv2D(64, 3, input_quantizer="recu_activation", kernel_quantizer="recu")
    ```
    """

    precision = 1

    def call(self, inputs, training=None):
        outputs = tf.__internal__.smart_cond.smart_cond(
            _training(training),
            lambda: recu_activation_sign(inputs),
            lambda: lq.math.sign(inputs),
        )
        return super().call(outputs)


def recu_tau_at(epoch: int, epochs: int, tau_min: float = 0.85, tau_max: float = 0.99):
    r"""ReCU's quantile schedule (`cpt_tau` in its `main.py`):
    \\(\tau(e) = A e^{e/E} + B\\), A = (tau_max - tau_min)/(e - 1), B = tau_min - A,
    so tau(0) = tau_min and tau(E) = tau_max; defaults from its `run.sh`."""
    a = (tau_max - tau_min) / (math.e - 1.0)
    return a * math.exp(epoch / epochs) + tau_min - a


@lq_utils.register_alias("recu")
@lq_utils.register_keras_custom_object
class ReCU(_ScheduledSign):
    r"""ReCU's weight quantizer (Xu, Lin, Zhang, Ji, Tian, Liao; ICCV 2021): the
    balanced, rectified clamp of the latent weights, then sign (see `recu_weight`).

    tau in (0.5, 1) is the quantile of |w1| kept unclamped; `EstimatorSchedule` raises
    it from 0.85 to 0.99 over training (`recu_tau_at`), logged as `tau`.

    ```python
    QuantConv2D(64, 3, input_quantizer="recu_activation", kernel_quantizer=ReCU(0.85))
    ```
    """

    schedule_name = "tau"
    elementwise_monotone_estimator = False  # no frozen_fraction (see there)

    def __init__(self, tau: float = 0.85, **kwargs):
        _check(0.5 < float(tau) < 1.0, f"ReCU: tau must be in (0.5, 1) (got {tau}).")
        super().__init__(tau, **kwargs)

    @property
    def tau(self) -> float:
        return float(self.schedule_variable.numpy())

    @tau.setter
    def tau(self, value: float):
        _check(0.5 < float(value) < 1.0, f"ReCU: tau must be in (0.5, 1) (got {value}).")
        self.schedule_variable.assign(float(value))

    def call(self, inputs):
        return super().call(recu_weight(inputs, self._value()))

    def get_config(self):
        return {**super().get_config(), "tau": self.tau}


def biper_weight(w, freq=20.0, binary=True):
    r"""BiPer's periodic weights (Vargas, Jacome, Arguello; CVPR 2024), as its code
    computes them: stage 1 \\(\sin(\omega w)\\) (real-valued), stage 2
    \\(\mathrm{sign}(\sin(\omega w))\\), a square wave of w, with the identity as
    sign's backward, so \\(\partial q/\partial w = \omega\cos(\omega w)\\). omega = `freq`
    (20 in its run scripts)."""
    dtype = _compute_dtype(w)
    wave = tf.sin(tf.cast(freq, dtype) * tf.cast(w, dtype))
    return tf.cast(_identity_sign(wave) if binary else wave, w.dtype)


def biper_regularizer(w, freq=20.0):
    r"""BiPer's loss term per binary conv, before its weight tau: the code's
    \\(\mathrm{mean}(0.5 - 0.5\cos(2\omega w)) = \mathrm{mean}(\sin^2(\omega w))\\)."""
    return tf.reduce_mean(0.5 - 0.5 * tf.cos(2.0 * freq * tf.cast(w, tf.float32)))


@lq_utils.register_alias("biper")
@lq_utils.register_keras_custom_object
class BiPer(_BaseQuantizer):
    r"""BiPer's weight quantizer (see `biper_weight`), and its regularizer
    \\(\tau\,\mathrm{mean}(\sin^2(\omega w))\\) added to the model's loss
    (`add_loss`, so `model.fit` minimizes it) when `tau` > 0.

    Stage 2 (`binary=True`, the deployed network): sign(sin(omega w)), +-1, which LCE
    converts. Stage 1 (`binary=False`, alias `biper_stage1`): sin(omega w) itself,
    real-valued weights: a stage-1 model is not a binary network (precision 32; its
    convs export as float convs); stage 2 starts from it (`--init-from`). The BiPer
    code's CIFAR-10 scripts: stage 1 tau 0.037, stage 2 tau 0.0468, omega 20.

    ```python
    QuantConv2D(64, 3, input_quantizer="recu_activation", kernel_quantizer="biper")
    ```
    """

    elementwise_monotone_estimator = False  # no frozen_fraction (see there)

    def __init__(self, freq: float = 20.0, tau: float = 0.0468, binary: bool = True, **kwargs):
        _check(float(freq) > 0.0, f"BiPer: freq must be > 0 (got {freq}).")
        _check(float(tau) >= 0.0, f"BiPer: tau must be >= 0 (got {tau}).")
        super().__init__(**kwargs)
        self.freq, self.tau, self.binary = float(freq), float(tau), bool(binary)
        self.precision = 1 if self.binary else 32

    def call(self, inputs):
        if self.tau:
            self.add_loss(self.tau * biper_regularizer(inputs, self.freq))
        return super().call(biper_weight(inputs, self.freq, self.binary))

    def get_config(self):
        return {**super().get_config(), "freq": self.freq, "tau": self.tau, "binary": self.binary}


@lq_utils.register_alias("biper_stage1")
@lq_utils.register_keras_custom_object
class BiPerStage1(BiPer):
    """BiPer's stage 1: `BiPer(binary=False, tau=0.037)` (real-valued sin(omega w))."""

    def __init__(self, freq: float = 20.0, tau: float = 0.037, binary: bool = False, **kwargs):
        _check(not binary, "BiPerStage1 is BiPer's stage 1: binary=False; use BiPer.")
        super().__init__(freq, tau, False, **kwargs)


# ------------------------------------------------------------------------- estimators
# An estimator is the (activation quantizer, kernel quantizer) pair a model uses.
ESTIMATORS: dict[str, tuple[str, str]] = {
    "ste": ("ste", "ste"),  # BNN (Hubara et al.): hard-tanh STE
    "binary_connect": ("binary_connect", "binary_connect"),
    "bnn+": ("bnn+", "bnn+"),  # BNN+ (Darabi et al.): SignSwish backward
    "approx_sign": ("approx_sign", "approx_sign"),
    "bireal": ("approx_sign", "magnitude_aware_sign"),  # Bi-Real Net (Liu et al.)
    "wrn_sign": ("ste", "wrn_sign"),  # McDonnell's weights; STE if acts are binary
    "reste": ("reste", "reste"),
    # ProxConnect++ binarizes weights: BNN++ on the kernels, the classic STE on the
    # activations. BNN++ on activations too ("bnnpp_all") is unstable: its derivative
    # peaks at mu and compounds over the layers (README, Results).
    "bnnpp": ("ste", "bnnpp"),
    "bnnpp_all": ("bnnpp", "bnnpp"),
    "recu": ("recu_activation", "recu"),  # ReCU (Xu et al.)
    "biper": ("recu_activation", "biper"),  # BiPer stage 2 (Vargas et al.)
    "biper_stage1": ("recu_activation", "biper_stage1"),  # its real-valued stage 1
}
_ESTIMATOR_ALIASES = {
    "ReSTE": "reste",
    "bnn++": "bnnpp",
    "BNNpp": "bnnpp",
    "ReCU": "recu",
    "BiPer": "biper",
    "bnn": "ste",
    "ste_sign": "ste",
    "swish_sign": "bnn+",
    "magnitude_aware_sign": "bireal",
    "bc": "binary_connect",
}


def estimators() -> list[str]:
    """The estimator names accepted by `estimator_quantizers` and `--quantizer`."""
    return sorted(ESTIMATORS)


def canonical_estimator(name: str) -> str:
    """'ReSTE' -> 'reste'; raises a ConfigError naming the choices if unknown."""
    name = _ESTIMATOR_ALIASES.get(name, name)
    if name not in ESTIMATORS:
        aliases = ", ".join(sorted(_ESTIMATOR_ALIASES))
        raise ConfigError(
            f"unknown quantizer {name!r}; choose one of {', '.join(estimators())} "
            f"(aliases: {aliases})"
        )
    return name


def estimator_quantizers(name: str, *, a32: bool = False, w32: bool = False):
    """(input_quantizer, kernel_quantizer) instances for an estimator name.

    `a32=True` keeps activations real (input quantizer None), the 1W/32A setting;
    `w32=True` keeps weights real (kernel quantizer None), the 32W/1A setting of
    ReActNet's first training step. Both at once would leave nothing binary.
    """
    if a32 and w32:
        raise ConfigError("a32 and w32 together leave nothing binary; use quantizer 'float'")
    input_name, kernel_name = ESTIMATORS[canonical_estimator(name)]
    input_q = None if a32 else lq.quantizers.get(input_name)
    return input_q, None if w32 else lq.quantizers.get(kernel_name)


def scheduled_quantizers(model: tf.keras.Model, kind=_ScheduledSign):
    """Every quantizer of class `kind` in `model` (inputs and kernels, inside wrappers)."""
    found, seen = [], set()

    def visit(q):
        if q is None or id(q) in seen:
            return
        seen.add(id(q))
        if isinstance(q, kind):
            found.append(q)
        visit(getattr(q, "quantizer", None))

    for layer in model.submodules:
        for attr in ("input_quantizer", "kernel_quantizer", "depthwise_quantizer"):
            visit(getattr(layer, attr, None))
    return found
