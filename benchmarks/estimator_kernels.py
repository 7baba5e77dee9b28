"""Cost of one estimator backward pass on an activation-sized tensor, before and after
the ReSTE/BNN++ speed-ups.

    python benchmarks/estimator_kernels.py            # 128x32x32x16, 30 repeats
    python benchmarks/estimator_kernels.py --from-memory 20 --shape 3 3 64 64

Times d(loss)/dx = dy * q'(x) for a 128x32x32x16 float32 tensor (the largest binary
activation of resnet20_1w1a at batch 128), interleaved, median of --repeats:
- ste_sign (Larq): where(|x| <= 1, dy, 0), unfused TF ops; the same as an XLA kernel
  on the NHWC tensor and flattened (`FusedSteSign` without the native kernels);
  and the mask product dy * (|x| <= 1) in TF ops (a candidate, not shipped);
- reste, pow form (the first implementation): tf.pow, which has no vectorized CPU kernel;
- reste, exp/log form, unfused TF ops;
- reste, exp/log form fused by XLA (`reste_larq.quantizers._reste_backward`), on the
  NHWC tensor as before and flattened to 1-D (bit-identical values), what trains where
  the native kernels do not build;
- the native kernels (`reste_larq.native`, shipped where g++ builds them): the STE's
  and ReSTE's backward as compiled TensorFlow ops;
- bnn+ (Larq's swish_sign backward) and the XLA-fused SignSwish derivative (bnnpp,
  bnn+), NHWC (before) and flat (shipped);
- the plain product x * dy as a TensorFlow `Mul` and as an XLA function on the NHWC
  tensor and flat: XLA's CPU code for a 16-channel NHWC tensor vectorizes across the
  wrong axis (masked gathers/scatters), which flattening avoids;
- and four forward passes ("fwd"): `larq.math.sign` (three TF ops, what inference
  graphs keep), the native `BinarySign` (one pass, what training steps run where the
  kernels build), and the candidates sign(x) - 1 as TF ops and as one XLA kernel (a
  shifted one-padded conv's input; tried and reverted, docs/results.md).

By default every call reads the same x and dy, which stay in the CPU's cache.
`--from-memory K` times K passes per call over K different (x, dy) pairs, so each pass
reads its tensors from memory, as a backward pass over stored activations does; the
figure is per pass (the K passes are independent: TensorFlow may run two at once).
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

from reste_larq import native  # noqa: E402
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
    p.add_argument("--shape", type=int, nargs="+", default=[128, 32, 32, 16])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument(
        "--from-memory",
        type=int,
        default=0,
        metavar="K",
        help="time K passes per call on K different tensors (none in cache, as in a "
        "backward pass over stored activations); the figure is per pass",
    )
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    count = max(args.from_memory, 1)
    xs = [tf.constant(rng.standard_normal(args.shape).astype(np.float32)) for _ in range(count)]
    dys = [tf.constant(rng.standard_normal(args.shape).astype(np.float32)) for _ in range(count)]
    o, mu = tf.constant(2.0), tf.constant(5.0)
    passes = {  # name -> f(x, dy); the forward passes ("fwd") ignore dy
        "ste_sign backward (Larq)": ste_backward,
        "ste_sign, XLA": lambda x, dy: ste_backward_xla(x, dy),
        "ste_sign, mask product": ste_backward_mask_product,
        "ste, XLA flat (no g++)": lambda x, dy: Q._ste_backward(x, dy, 1.0),
        "reste, tf.pow (before)": lambda x, dy: reste_backward_pow(x, dy, o),
        "reste, exp/log unfused": lambda x, dy: reste_backward_unfused(x, dy, o),
        "reste, XLA on NHWC (before)": lambda x, dy: Q._reste_backward.compiled(x, dy, o, 1.5, 0.1),
        "reste, XLA flat (no g++)": lambda x, dy: Q._reste_backward(x, dy, o, 1.5, 0.1),
        "swish_sign backward (Larq)": larq_swish_backward,
        "signswish XLA on NHWC (before)": lambda x, dy: Q._signswish_backward.compiled(x, dy, mu),
        "signswish XLA flat (shipped)": lambda x, dy: Q._signswish_backward(x, dy, mu),
        "x * dy, TF Mul (reference)": lambda x, dy: x * dy,
        "x * dy, XLA on NHWC": lambda x, dy: product_xla.compiled(x, dy),
        "x * dy, XLA flat": product_xla,
        "fwd: larq.math.sign": lambda x, dy: lq.math.sign(x),
        "fwd: sign - 1, TF ops": lambda x, dy: lq.math.sign(x) - 1.0,
        "fwd: sign - 1, XLA": lambda x, dy: sign_minus_one_xla(x),
    }

    kernels = native.ops()  # reste_larq.native: the default where they build
    if kernels is not None:
        passes["ste, native (shipped)"] = lambda x, dy: kernels.ste_grad(x, dy, tf.constant(1.0))
        passes["reste, native (shipped)"] = lambda x, dy: kernels.reste_grad(
            x, dy, o, t=1.5, interval=0.1
        )
        passes["fwd: BinarySign, native (training)"] = lambda x, dy: kernels.binary_sign(x)

    def timed(f):
        if not args.from_memory:
            return tf.function(lambda: f(xs[0], dys[0]), autograph=False)
        # K independent passes, each output kept alive by one of its elements
        return tf.function(
            lambda: tf.stack([tf.reshape(f(x, dy), [-1])[0] for x, dy in zip(xs, dys)]),
            autograph=False,
        )

    variants = {name: timed(f) for name, f in passes.items()}
    one = {name: tf.function(lambda f=f: f(xs[0], dys[0])) for name, f in passes.items()}
    for a, b in (
        ("ste_sign backward (Larq)", "ste_sign, mask product"),
        ("ste_sign backward (Larq)", "ste, XLA flat (no g++)"),
        ("fwd: sign - 1, TF ops", "fwd: sign - 1, XLA"),
        ("reste, XLA on NHWC (before)", "reste, XLA flat (no g++)"),
        ("signswish XLA on NHWC (before)", "signswish XLA flat (shipped)"),
        ("x * dy, XLA on NHWC", "x * dy, XLA flat"),
    ):
        np.testing.assert_array_equal(one[a]().numpy(), one[b]().numpy())
    if kernels is not None:
        np.testing.assert_array_equal(
            one["ste_sign backward (Larq)"]().numpy(), one["ste, native (shipped)"]().numpy()
        )
        np.testing.assert_array_equal(
            one["fwd: larq.math.sign"]().numpy(),
            one["fwd: BinarySign, native (training)"]().numpy(),
        )
        np.testing.assert_allclose(
            one["reste, native (shipped)"]().numpy(),
            one["reste, XLA flat (no g++)"]().numpy(),
            rtol=5e-7,
        )
    np.testing.assert_allclose(
        one["reste, tf.pow (before)"]().numpy(),
        one["reste, XLA flat (no g++)"]().numpy(),
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
            times[name].append(1000 * (time.perf_counter() - start) / count)
    base = statistics.median(times["ste_sign backward (Larq)"])
    print(
        f"one pass over a {'x'.join(map(str, args.shape))} float32 tensor, median of "
        f"{args.repeats} interleaved runs"
        + (f" of {count} passes on different tensors" if args.from_memory else "")
        + f", {os.cpu_count()} CPUs, TF {tf.__version__}"
    )
    print(f"{'variant':<32}{'median ms':>10}{'min':>8}{'max':>8}{'x ste_sign':>12}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<32}{med:>10.2f}{min(ts):>8.2f}{max(ts):>8.2f}{med / base:>12.2f}")


if __name__ == "__main__":
    main()
