"""Accuracy of the estimators on real data: Fashion-MNIST (Debian's dataset-fashion-mnist).

    python benchmarks/accuracy.py --epochs 6
    python benchmarks/accuracy.py --epochs 6 --variants reste:one reste:zero   # padding
    python benchmarks/accuracy.py --epochs 6 --variants reste reste+jit reste+bf16
    python benchmarks/accuracy.py --epochs 6 --variants reste reste+kd reste+multistage \
        --seeds 1234 1235                                   # distillation, two seeds

A variant is "estimator[:padding][+option...]" ("float" for the full-precision
ceiling), options: jit (--jit-compile), bf16 / fp16 (--mixed-precision), prelu /
react (--block: BNN-tricks' PReLU block, ReActNet's RSign/RPReLU), kd
(distilled from the float variant's run of the same seed and budget, trained first
if missing: --teacher), multistage (`python -m train.multistage`, stages
float,w32,1w1a splitting the same epochs: 2+2+2 of 6; every binary stage starts
from the previous one and is distilled from the float stage).

Each variant is one
`python -m train.cifar` run with the same seed, schedule and data: resnet20_1w1a,
SGD lr 0.1 momentum 0.9, weight decay 1e-4, batch 256, cosine decay with a 1-epoch
warm-up, o: 1 -> 3 (ReSTE), mu: 20 -> 200 (BNN++; --mu-start/--mu-end change it).
Every run exports the LCE .tflite and evaluates it on the 10,000 test images with
LCE's interpreter. Prints a table of Keras and TFLite top-1 and draws test top-1 per
epoch of every run (--plot, a PNG; needs matplotlib: pip install -r
benchmarks/requirements.txt). The run folders stay in --results-dir, and a variant
whose folder holds a finished run is not run again.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train import cifar, multistage  # noqa: E402

OPTIONS = {
    "jit": ["--jit-compile"],
    "bf16": ["--mixed-precision", "bfloat16"],
    "fp16": ["--mixed-precision", "float16"],
    "prelu": ["--block", "prelu"],
    "react": ["--block", "react"],
}


def _split(variant, parser):
    base, *options = variant.split("+")
    quantizer, _, padding = base.partition(":")
    unknown = sorted(set(options) - set(OPTIONS) - {"kd", "multistage"})
    if unknown:
        parser.error(
            f"unknown option(s) {', '.join(unknown)} in {variant!r}; "
            f"choose from {', '.join([*OPTIONS, 'kd', 'multistage'])}"
        )
    if quantizer == "float" and {"kd", "multistage"} & set(options):
        parser.error(f"{variant!r}: kd and multistage need a binary estimator")
    return quantizer, padding or "one", options


def _finished(run):
    return os.path.exists(os.path.join(run, "metrics.json"))


def _metrics(run):
    with open(os.path.join(run, "metrics.json")) as f:
        return json.load(f)


def _history_top1(run):
    with open(os.path.join(run, "history.csv")) as f:
        return [100.0 * float(row["val_accuracy"]) for row in csv.DictReader(f)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--variants", nargs="+", default=["ste", "reste", "bnnpp", "float"])
    p.add_argument("--model", default="resnet20_1w1a")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seeds", "--seed", type=int, nargs="+", default=[1234])
    p.add_argument("--results-dir", default="results/accuracy")
    p.add_argument("--train-limit", type=int, default=None, help="train on the first N images only")
    p.add_argument("--mu-start", type=float, default=None, help="BNN++ mu schedule start")
    p.add_argument("--mu-end", type=float, default=None, help="BNN++ mu schedule end")
    p.add_argument(
        "--plot",
        default=None,
        help="PNG of test top-1 per epoch (default: RESULTS_DIR/accuracy_<model>_<dataset>"
        "_e<epochs>.png); --no-plot skips it",
    )
    p.add_argument("--no-plot", action="store_true", help="draw no PNG")
    args = p.parse_args(argv)
    parsed = [(v, *_split(v, p)) for v in args.variants]
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error(
                "the plot needs matplotlib: pip install -r benchmarks/requirements.txt "
                "(or pass --no-plot)"
            )

    def flags(quantizer, padding, seed, name, extra=()):
        out = [
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
            str(seed),
            "--results-dir",
            args.results_dir,
            "--name",
            name,
            "--verbose",
            "2",
            "--no-download",
            *extra,
        ]
        out += ["--train-limit", str(args.train_limit)] if args.train_limit else []
        if "--mixed-precision" not in extra:
            # float32 on every machine (the CLI's default, auto, is bfloat16 on CPUs with
            # AVX-512 BF16): variants differ only by their options
            out += ["--mixed-precision", "off"]
        return out + (["--data-dir", args.data_dir] if args.data_dir else [])

    def train(quantizer, padding, seed, name, extra=()):
        run = os.path.join(args.results_dir, name)
        if not _finished(run):
            argv = flags(quantizer, padding, seed, name, extra)
            if os.path.isdir(os.path.join(run, "checkpoint")):
                argv.append("--resume")
            elif os.path.exists(run):  # stopped before its first epoch ended
                shutil.rmtree(run)
            started = time.time()
            if cifar.main(argv) != 0:
                raise SystemExit(f"run {name} failed")
            print(f"{name}: {time.time() - started:.0f} s", flush=True)
        return run

    rows = []  # (label, seed, metrics, per-epoch top-1)
    for seed in args.seeds:
        for variant, quantizer, padding, options in parsed:
            prefix = f"{args.model}_{args.dataset}"
            prefix += f"_n{args.train_limit}" if args.train_limit else ""
            name = f"{prefix}_{quantizer}_{padding}_e{args.epochs}_s{seed}"
            name += "".join(f"_{option}" for option in options)
            extra = [flag for option in options if option in OPTIONS for flag in OPTIONS[option]]
            label = variant
            if quantizer.startswith("bnnpp") and (args.mu_start or args.mu_end):
                mu = [str(args.mu_start or 20.0), str(args.mu_end or 200.0)]
                extra += ["--mu-start", mu[0], "--mu-end", mu[1]]
                name += f"_mu{mu[0]}-{mu[1]}"
                label += f" mu {mu[0]}->{mu[1]}"
            if "multistage" in options:
                run = os.path.join(args.results_dir, name)
                per_stage = [args.epochs // 3] * 3
                per_stage[-1] += args.epochs - sum(per_stage)
                argv = flags(quantizer, padding, seed, name, extra)
                argv[argv.index("--epochs") : argv.index("--epochs") + 2] = []
                argv += ["--stages", "float,w32,1w1a", "--epochs-per-stage", *map(str, per_stage)]
                started = time.time()
                if multistage.main(argv) != 0:
                    raise SystemExit(f"run {name} failed")
                print(f"{name}: {time.time() - started:.0f} s", flush=True)
                stages = sorted(d for d in os.listdir(run) if os.path.isdir(os.path.join(run, d)))
                curve = [t for d in stages for t in _history_top1(os.path.join(run, d))]
                metrics = _metrics(os.path.join(run, stages[-1]))
                metrics["train_seconds"] = sum(
                    _metrics(os.path.join(run, d))["train_seconds"] for d in stages
                )
            else:
                if "kd" in options:
                    teacher = train(
                        "float", padding, seed, f"{prefix}_float_{padding}_e{args.epochs}_s{seed}"
                    )
                    extra += ["--teacher", teacher]
                run = train(quantizer, padding, seed, name, extra)
                curve = _history_top1(run)
                metrics = _metrics(run)
            rows.append((label, seed, metrics, curve))

    print(f"\n{args.model} on {args.dataset}, {args.epochs} epochs, seeds {args.seeds}")
    print(
        f"{'variant':<24}{'seed':>6}{'Keras top-1':>12}{'TFLite top-1':>14}"
        f"{'best epoch top-1':>18}{'LceBconv2d':>12}{'tflite KiB':>12}{'fit s':>8}"
    )
    for label, seed, m, _ in rows:
        print(
            f"{label:<24}{seed:>6}{m['test_top1']:>12.2f}{m['tflite_test_top1']:>14.2f}"
            f"{m['best_test_top1']:>18.2f}{m['tflite_lce_bconv2d']:>12d}"
            f"{m['tflite_bytes'] / 1024:>12.1f}{m['train_seconds']:>8.0f}"
        )
    if len(args.seeds) > 1:
        print(
            f"\n{'variant':<24}{'mean Keras':>12}{'mean TFLite':>14}"
            f"  (over {len(args.seeds)} seeds)"
        )
        for variant, *_ in parsed:
            ms = [m for label, _, m, _ in rows if label.split(" mu ")[0] == variant]
            print(
                f"{variant:<24}{statistics.mean(m['test_top1'] for m in ms):>12.2f}"
                f"{statistics.mean(m['tflite_test_top1'] for m in ms):>14.2f}"
            )
    if not args.no_plot:
        path = args.plot or os.path.join(
            args.results_dir,
            f"accuracy_{args.model}_{args.dataset}"
            + (f"_n{args.train_limit}" if args.train_limit else "")
            + f"_e{args.epochs}.png",
        )
        plot(rows, path, f"{args.model} on {args.dataset}, {args.epochs} epochs")
        print(f"plot: {path}")


def plot(rows, path, title):
    """Test top-1 per epoch, one line per run (a colour per variant, a line style per
    seed); multi-stage runs are drawn across their stages with the float stage first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    variants = list(dict.fromkeys(label for label, *_ in rows))
    seeds = list(dict.fromkeys(seed for _, seed, *_ in rows))
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for label, seed, _, curve in rows:
        ax.plot(
            range(1, len(curve) + 1),
            curve,
            styles[seeds.index(seed) % len(styles)],
            color=f"C{variants.index(label)}",
            marker="o",
            markersize=3,
            label=f"{label} (seed {seed})",
        )
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
