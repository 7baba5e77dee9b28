"""Accuracy of the estimators on real data: Fashion-MNIST (Debian's dataset-fashion-mnist).

    python benchmarks/accuracy.py --epochs 6
    python benchmarks/accuracy.py --epochs 6 --variants reste:one reste:zero   # padding
    python benchmarks/accuracy.py --epochs 6 --variants reste reste+jit reste+bf16

A variant is "estimator[:padding][+option...]" ("float" for the full-precision
ceiling), options: jit (--jit-compile), bf16 / fp16 (--mixed-precision).

Each variant is one
`python -m train.cifar` run with the same seed, schedule and data: resnet20_1w1a,
SGD lr 0.1 momentum 0.9, weight decay 1e-4, batch 256, cosine decay with a 1-epoch
warm-up, o: 1 -> 3 (ReSTE), mu: 20 -> 200 (BNN++; --mu-start/--mu-end change it).
Every run exports the LCE .tflite and evaluates it on the 10,000 test images with
LCE's interpreter. Prints a table of Keras and TFLite top-1; the run folders stay in
--results-dir, and a variant whose folder holds a finished run is not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train import cifar  # noqa: E402

OPTIONS = {
    "jit": ["--jit-compile"],
    "bf16": ["--mixed-precision", "bfloat16"],
    "fp16": ["--mixed-precision", "float16"],
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--variants", nargs="+", default=["ste", "reste", "bnnpp", "float"])
    p.add_argument("--model", default="resnet20_1w1a")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--results-dir", default="results/accuracy")
    p.add_argument("--mu-start", type=float, default=None, help="BNN++ mu schedule start")
    p.add_argument("--mu-end", type=float, default=None, help="BNN++ mu schedule end")
    args = p.parse_args(argv)

    rows = []
    for variant in args.variants:
        base, *options = variant.split("+")
        quantizer, _, padding = base.partition(":")
        padding = padding or "one"
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            p.error(
                f"unknown option(s) {', '.join(unknown)} in {variant!r}; "
                f"choose from {', '.join(OPTIONS)}"
            )
        option_flags = [flag for option in options for flag in OPTIONS[option]]
        name = f"{args.model}_{args.dataset}_{quantizer}_{padding}_e{args.epochs}_s{args.seed}"
        name += "".join(f"_{option}" for option in options)
        mu_flags = []
        if quantizer.startswith("bnnpp") and (args.mu_start or args.mu_end):
            mu_flags = [
                "--mu-start",
                str(args.mu_start or 20.0),
                "--mu-end",
                str(args.mu_end or 200.0),
            ]
            name += f"_mu{mu_flags[1]}-{mu_flags[3]}"
        run = os.path.join(args.results_dir, name)
        if not os.path.exists(os.path.join(run, "metrics.json")):
            flags = [
                "--model",
                args.model,
                "--dataset",
                args.dataset,
                "--quantizer",
                quantizer,
                "--padding",
                padding,
                "--epochs",
                str(args.epochs),
                "--warmup",
                "1",
                "--seed",
                str(args.seed),
                "--results-dir",
                args.results_dir,
                "--name",
                name,
                "--verbose",
                "2",
                "--no-download",
                *mu_flags,
                *option_flags,
            ]
            if args.data_dir:
                flags += ["--data-dir", args.data_dir]
            if os.path.exists(run):
                flags.append("--resume")
            started = time.time()
            if cifar.main(flags) != 0:
                raise SystemExit(f"run {name} failed")
            print(f"{name}: {time.time() - started:.0f} s", flush=True)
        with open(os.path.join(run, "metrics.json")) as f:
            rows.append(
                (variant + (f" mu {mu_flags[1]}->{mu_flags[3]}" if mu_flags else ""), json.load(f))
            )

    print(f"\n{args.model} on {args.dataset}, {args.epochs} epochs, seed {args.seed}")
    print(
        f"{'variant':<24}{'Keras top-1':>12}{'TFLite top-1':>14}{'best epoch top-1':>18}"
        f"{'LceBconv2d':>12}{'tflite KiB':>12}{'fit s':>8}"
    )
    for variant, m in rows:
        print(
            f"{variant:<24}{m['test_top1']:>12.2f}{m['tflite_test_top1']:>14.2f}"
            f"{m['best_test_top1']:>18.2f}{m['tflite_lce_bconv2d']:>12d}"
            f"{m['tflite_bytes'] / 1024:>12.1f}{m['train_seconds']:>8.0f}"
        )


if __name__ == "__main__":
    main()
