"""How much of a freshly initialized model BNN++ freezes at each mu: the frozen fraction
(`reste_larq.callbacks.frozen_fraction`: estimator derivative < 1e-3, so the loss can
no longer flip the weight) of the binary kernels at initialization, per mu, beside the
mu the default schedule reaches at each fraction of the run.

    python benchmarks/signswish_frozen.py
    python benchmarks/signswish_frozen.py --model resnet18_1w1a --input-shape 32 32 3

SignSwish's derivative mu (2 - mu w tanh(mu w / 2)) / (1 + cosh(mu w)) is negative
beyond mu |w| ~ 2.4, so the frozen share of a kernel is the share of |w| > 2.4 / mu.
Latent weights move during training; this is the starting point, and the frozen
fraction logged per epoch (history.csv) is the trajectory.

Beside it, the mean estimator derivative over the same weights, for BNN++ per mu and
for ReSTE per o: the gain the estimator applies to the gradient reaching the latent
kernels, i.e. how far one SGD step moves them (STE's is 1 on |w| <= 1).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reste_larq import callbacks, models  # noqa: E402
from reste_larq.quantizers import BNNpp, ReSTE, scheduled_quantizers  # noqa: E402


def mean_derivative(model) -> float:
    """Mean of the estimator derivative d q(w)/dw over every binary-kernel weight."""
    derivatives = [d.numpy().ravel() for _, d in callbacks.estimator_derivatives(model)]
    return float(np.concatenate(derivatives).mean())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20_1w1a")
    p.add_argument("--input-shape", type=int, nargs=3, default=[28, 28, 1])
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--mu", type=float, nargs="+", default=[5, 10, 20, 30, 50, 75, 100, 150, 200])
    p.add_argument("--o", type=float, nargs="+", default=[1, 1.6, 2, 3])
    p.add_argument("--mu-start", type=float, default=20.0)
    p.add_argument("--mu-end", type=float, default=200.0)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)

    import tensorflow as tf

    def build(quantizer):
        tf.keras.utils.set_random_seed(args.seed)
        return models.build(
            args.model,
            quantizer=quantizer,
            input_shape=tuple(args.input_shape),
            num_classes=args.num_classes,
        )

    model = build("bnnpp")
    kernels = np.concatenate([k.numpy().ravel() for k in callbacks.binary_kernels(model)])
    print(
        f"{args.model}, {kernels.size} binary-kernel weights at initialization (seed "
        f"{args.seed}): mean |w| {np.abs(kernels).mean():.4f}"
    )
    print(f"{'mu':>8}{'frozen %':>10}{'2.4 / mu':>10}{'mean dq/dw':>12}")
    for mu in args.mu:
        for q in scheduled_quantizers(model, BNNpp):
            q.mu = mu
        print(
            f"{mu:>8g}{100 * callbacks.frozen_fraction(model):>10.1f}{2.4 / mu:>10.4f}"
            f"{mean_derivative(model):>12.2f}"
        )

    reste = build("reste")
    print(f"\nReSTE, same model and seed: {'o':>4}{'mean dq/dw':>12}")
    for o in args.o:
        for q in scheduled_quantizers(reste, ReSTE):
            q.o = o
        print(f"{'':>27}{o:>4g}{mean_derivative(reste):>12.2f}")

    schedule = callbacks.EstimatorSchedule(100, mu_start=args.mu_start, mu_end=args.mu_end)
    print(f"\nthe schedule's mu ({args.mu_start:g} -> {args.mu_end:g}, cosine ramp):")
    print("  " + ", ".join(f"{f}% of the run: {schedule.mu_at(f):.1f}" for f in (0, 25, 50, 75)))


if __name__ == "__main__":
    main()
