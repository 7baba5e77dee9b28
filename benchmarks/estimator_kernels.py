"""Cost of one estimator backward pass on an activation-sized tensor, before and after
the ReSTE/BNN++ speed-ups.

    python benchmarks/estimator_kernels.py            # 128x32x32x16, 30 repeats

Times d(loss)/dx = dy * q'(x) for a 128x32x32x16 float32 tensor (the largest binary
activation of resnet20_1w1a at batch 128), interleaved, median of --repeats:
- ste_sign (Larq): where(|x| <= 1, dy, 0), unfused TF ops; the same as an XLA kernel;
  and the mask product dy * (|x| <= 1) in TF ops (a candidate, not shipped);
- reste, pow form (the first implementation): tf.pow, which has no vectorized CPU kernel;
- reste, exp/log form, unfused TF ops;
- reste, exp/log form fused by XLA (`reste_larq.quantizers._reste_backward`), on the
  NHWC tensor as before and flattened to 1-D as shipped (bit-identical values);
- bnn+ (Larq's swish_sign backward) and the XLA-fused SignSwish derivative (bnnpp,
  bnn+), NHWC (before) and flat (shipped);
- the plain product x * dy as a TensorFlow `Mul` and as an XLA function on the NHWC
  tensor and flat: XLA's CPU code for a 16-channel NHWC tensor vectorizes across the
  wrong axis (masked gathers/scatters), which flattening avoids;
- and three forward passes ("fwd"): `larq.math.sign` (three TF ops, shipped), and the
  candidates sign(x) - 1 as TF ops and as one XLA kernel (a shifted one-padded conv's
  input; tried and reverted, docs/results.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import reste_larq  # noqa: E402,F401  (first: TensorFlow with Keras 2 as tf.keras)

# isort: split
import larq as lq  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from reste_larq import quantizers as Q  # noqa: E402


def ste_backward(x, dy):
    return tf.where(tf.abs(x) <= 1.0, dy, tf.zeros_like(dy))


@tf.function(jit_compile=True)
def ste_backward_xla(x, dy):
    return ste_backward(x, dy)


@Q._elementwise_xla  # flat, as the shipped kernels; `.compiled` runs it on the NHWC tensor
def product_xla(x, dy):
    return x * dy


def ste_backward_mask_product(x, dy):
    return dy * tf.cast(tf.abs(x) <= 1.0, dy.dtype)


@tf.function(jit_compile=True)
def sign_minus_one_xla(x):
    return lq.math.sign(x) - 1.0


def reste_backward_pow(x, dy, o, t=1.5, interval=0.1):
    ax = tf.abs(x)
    exponent = (1.0 - o) / o
    inner = tf.pow(tf.constant(interval), exponent)
    outer = tf.pow(tf.maximum(ax, interval), exponent) / o
    slope = tf.where(ax <= interval, inner, outer)
    return dy * tf.where(ax <= t, slope, tf.zeros_like(slope))


def reste_backward_unfused(x, dy, o):
    return dy * Q.reste_gradient(x, o)


def larq_swish_backward(x, dy, beta=5.0):
    b_x = beta * x
    return dy * beta * (2 - b_x * tf.tanh(b_x * 0.5)) / (1 + tf.cosh(b_x))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=4, default=[128, 32, 32, 16])
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal(args.shape).astype(np.float32))
    dy = tf.constant(rng.standard_normal(args.shape).astype(np.float32))
    o, mu = tf.constant(2.0), tf.constant(5.0)
    variants = {
        "ste_sign backward (Larq)": tf.function(lambda: ste_backward(x, dy)),
        "ste_sign, XLA": tf.function(lambda: ste_backward_xla(x, dy)),
        "ste_sign, mask product": tf.function(lambda: ste_backward_mask_product(x, dy)),
        "reste, tf.pow (before)": tf.function(lambda: reste_backward_pow(x, dy, o)),
        "reste, exp/log unfused": tf.function(lambda: reste_backward_unfused(x, dy, o)),
        "reste, XLA on NHWC (before)": tf.function(
            lambda: Q._reste_backward.compiled(x, dy, o, 1.5, 0.1)
        ),
        "reste, XLA flat (shipped)": tf.function(lambda: Q._reste_backward(x, dy, o, 1.5, 0.1)),
        "swish_sign backward (Larq)": tf.function(lambda: larq_swish_backward(x, dy)),
        "signswish XLA on NHWC (before)": tf.function(
            lambda: Q._signswish_backward.compiled(x, dy, mu)
        ),
        "signswish XLA flat (shipped)": tf.function(lambda: Q._signswish_backward(x, dy, mu)),
        "x * dy, TF Mul (reference)": tf.function(lambda: x * dy),
        "x * dy, XLA on NHWC": tf.function(lambda: product_xla.compiled(x, dy)),
        "x * dy, XLA flat": tf.function(lambda: product_xla(x, dy)),
        "fwd: larq.math.sign": tf.function(lambda: lq.math.sign(x)),
        "fwd: sign - 1, TF ops": tf.function(lambda: lq.math.sign(x) - 1.0),
        "fwd: sign - 1, XLA": tf.function(lambda: sign_minus_one_xla(x)),
    }
    for a, b in (
        ("ste_sign backward (Larq)", "ste_sign, mask product"),
        ("fwd: sign - 1, TF ops", "fwd: sign - 1, XLA"),
        ("reste, XLA on NHWC (before)", "reste, XLA flat (shipped)"),
        ("signswish XLA on NHWC (before)", "signswish XLA flat (shipped)"),
        ("x * dy, XLA on NHWC", "x * dy, XLA flat"),
    ):
        np.testing.assert_array_equal(variants[a]().numpy(), variants[b]().numpy())
    np.testing.assert_allclose(
        variants["reste, tf.pow (before)"]().numpy(),
        variants["reste, XLA flat (shipped)"]().numpy(),
        rtol=1e-4,
        atol=1e-5,
    )
    times = {name: [] for name in variants}
    for fn in variants.values():
        fn().numpy()  # trace / compile
    for _ in range(args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn().numpy()
            times[name].append(1000 * (time.perf_counter() - start))
    base = statistics.median(times["ste_sign backward (Larq)"])
    print(
        f"backward of a {'x'.join(map(str, args.shape))} float32 tensor, median of "
        f"{args.repeats} interleaved runs, {os.cpu_count()} CPUs, TF {tf.__version__}"
    )
    print(f"{'variant':<32}{'median ms':>10}{'min':>8}{'max':>8}{'x ste_sign':>12}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<32}{med:>10.2f}{min(ts):>8.2f}{max(ts):>8.2f}{med / base:>12.2f}")


if __name__ == "__main__":
    main()
