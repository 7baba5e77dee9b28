"""Estimators across training budgets: Keras top-1 and frozen fraction per (data, epochs).

    python benchmarks/budget_sweep.py                       # the default grid
    python benchmarks/budget_sweep.py --train-limits 10000 60000 --epochs 2 5 10 20 \\
        --variants reste ste bnnpp "bnnpp,mu_start=5,mu_end=50" "reste,o_end=2" \\
        --seeds 1234 1235
    python benchmarks/budget_sweep.py --report ...          # tables and plot only
    python benchmarks/budget_sweep.py --report ... --quoted docs/budget_sweep_quoted.json
                                          # ... with cells of earlier sweeps, marked

A variant is an estimator name with optional `train.cifar` settings after commas
(`flag=value`, flags without their dashes: o_end, mu_start, mu_end, lr, ...), or
`biper_two_stage`: BiPer's two stages within the cell's epochs (biper_stage1 for two
thirds, then biper from its weights; `run_biper_two_stage`). Every
cell is one `python -m train.cifar` run on Fashion-MNIST (Debian's
dataset-fashion-mnist): resnet20_1w1a, SGD 0.1, cosine, 1-epoch warm-up, batch 256,
the first N training images (`--train-limit`), no export (Keras top-1 on the 10,000
test images). The schedules follow the fraction of epochs done, so every budget runs
the whole o / mu ramp.

Prints one table per training-set size (rows: variant, columns: epochs; mean over
seeds) of Keras top-1 at the final epoch and at the best epoch (the papers' figure:
the best test accuracy over the epochs), and of the last epoch's frozen fraction (the
share of latent weights whose estimator derivative is < 1e-3, which the loss can no
longer flip; none for ReCU and BiPer), and
draws top-1 against epochs, beside the longest run's per-epoch top-1 and frozen
fraction (--plot; matplotlib: pip install -r benchmarks/requirements.txt).

Finished runs in --results-dir are not run again: the sweep can be stopped and
restarted, and sweeps over different grids (or several run side by side) combine with
--report, which trains nothing and prints a missing cell as -.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reste_larq import quantizers  # noqa: E402
from train import cifar  # noqa: E402


def frozen(metrics):
    """Per-epoch frozen fraction of a run, NaN where it does not apply: the kernel
    quantizer's own word (reste_larq.callbacks.frozen_fraction), since runs made before
    it said so logged a number for ReCU and BiPer too."""
    quantizer = metrics.get("quantizer")
    if quantizer and quantizer != "float":
        kernel = quantizers.estimator_quantizers(quantizer)[1]
        if not getattr(kernel, "elementwise_monotone_estimator", True):
            return [math.nan for _ in metrics["per_epoch"]]
    return [r.get("frozen_fraction", math.nan) for r in metrics["per_epoch"]]


def parse_variant(text, parser):
    estimator, *settings = text.split(",")
    flags = []
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key:
            parser.error(f"variant {text!r}: settings are flag=value (got {setting!r})")
        flags += [f"--{key.replace('_', '-')}", value]
    return estimator, flags


# BiPer's two-stage recipe inside one cell's budget: stage 1 (real-valued sin(omega w),
# `biper_stage1`) for two thirds of the epochs, then stage 2 (`biper`, the binary
# network) from its weights (`--init-from`) for the rest, as BiPer's CIFAR-10 scripts
# split 600 + 300 epochs. Each stage runs the sweep's recipe (its own warm-up and cosine),
# not BiPer's per-stage learning rates and weight decays.
TWO_STAGE = "biper_two_stage"


def two_stage_epochs(epochs: int) -> tuple[int, int]:
    """(stage 1, stage 2) epochs of a cell: 2/3 and 1/3, each at least 1."""
    if epochs < 2:
        raise SystemExit(f"{TWO_STAGE} needs at least 2 epochs a cell (got {epochs})")
    first = min(max(1, round(2 * epochs / 3)), epochs - 1)
    return first, epochs - first


def run_biper_two_stage(argv, epochs, name, results_dir):
    """The cell's run folder `name` is stage 2 (its metrics.json is the cell's);
    stage 1 is `name`_stage1 beside it."""
    first, second = two_stage_epochs(epochs)
    stage1 = f"{name}_stage1"
    base = list(argv)
    for flag, value in (
        ("--quantizer", "biper_stage1"),
        ("--epochs", str(first)),
        ("--name", stage1),
        ("--warmup", str(min(1, first - 1))),  # a 1-epoch stage has no room to warm up
    ):
        base[base.index(flag) + 1] = value
    if "--resume" in base:
        base.remove("--resume")
    if os.path.isdir(os.path.join(results_dir, stage1, "checkpoint")):
        base.append("--resume")
    done = os.path.isfile(os.path.join(results_dir, stage1, "metrics.json"))
    if not done and cifar.main(base) != 0:
        raise SystemExit(f"run {stage1} failed")
    final = list(argv)
    final[final.index("--quantizer") + 1] = "biper"
    final[final.index("--epochs") + 1] = str(second)
    final[final.index("--warmup") + 1] = str(min(1, second - 1))
    if "--resume" not in final:
        final += ["--init-from", os.path.join(results_dir, stage1)]
    if cifar.main(final) != 0:
        raise SystemExit(f"run {name} failed")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-limits", type=int, nargs="+", default=[10_000, 60_000])
    p.add_argument("--epochs", type=int, nargs="+", default=[2, 5, 10, 20])
    p.add_argument("--variants", nargs="+", default=["reste", "ste", "bnnpp"])
    p.add_argument("--seeds", type=int, nargs="+", default=[1234])
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--results-dir", default="results/budget_sweep")
    p.add_argument("--plot", default=None, help="PNG (default: RESULTS_DIR/budget_sweep.png)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--report",
        action="store_true",
        help="train nothing: tabulate and plot the finished cells of the grid (a missing "
        "cell prints as -), e.g. to combine sweeps run with different epoch lists",
    )
    p.add_argument(
        "--quoted",
        default=None,
        metavar="JSON",
        help="with --report: cells measured earlier whose run folders are not in "
        "--results-dir (a JSON list of {variant, train_limit, epochs, seed, test_top1, "
        "best_test_top1 or null, frozen_percent or null, source}); they fill only grid cells "
        "without a run folder, print with a * and their source, and plot as open markers",
    )
    args = p.parse_args(argv)
    if args.quoted and not args.report:
        p.error("--quoted is for --report (a sweep trains its missing cells)")
    variants = [(v, *parse_variant(v, p)) for v in args.variants]
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("the plot needs matplotlib: pip install -r benchmarks/requirements.txt")

    results = {}  # (limit, epochs, variant) -> [metrics per seed]
    for limit in args.train_limits:
        for epochs in args.epochs:
            for seed in args.seeds:
                for variant, estimator, flags in variants:
                    slug = variant.replace(",", "_").replace("=", "")
                    name = f"{args.dataset}_n{limit}_e{epochs}_{slug}_s{seed}"
                    run = os.path.join(args.results_dir, name)
                    if not os.path.isfile(os.path.join(run, "metrics.json")):
                        if args.report:
                            continue
                        argv = [
                            "--dataset", args.dataset, "--quantizer", estimator,
                            "--epochs", str(epochs), "--warmup", "1",
                            "--train-limit", str(limit), "--seed", str(seed),
                            "--results-dir", args.results_dir, "--name", name,
                            "--no-export", "--no-download", "--verbose", "2", *flags,
                        ]  # fmt: skip
                        if "--mixed-precision" not in flags:
                            # every cell float32, on every machine (the CLI's default,
                            # auto, is bfloat16 on CPUs with AVX-512 BF16)
                            argv += ["--mixed-precision", "off"]
                        if args.data_dir:
                            argv += ["--data-dir", args.data_dir]
                        if os.path.isdir(os.path.join(run, "checkpoint")):
                            argv.append("--resume")
                        started = time.time()
                        if estimator == TWO_STAGE:
                            run_biper_two_stage(argv, epochs, name, args.results_dir)
                        elif cifar.main(argv) != 0:
                            raise SystemExit(f"run {name} failed")
                        print(f"{name}: {time.time() - started:.0f} s", flush=True)
                    with open(os.path.join(run, "metrics.json")) as f:
                        results.setdefault((limit, epochs, variant), []).append(json.load(f))

    sources = add_quoted(args, p, results) if args.quoted else []
    if not results:
        p.error(f"no finished cell of this grid in {args.results_dir}: run it without --report")
    for limit in args.train_limits:
        for title, value in (
            ("Keras top-1, final epoch", lambda m: m["test_top1"]),
            # the papers quote the best epoch's test accuracy: shown beside, not instead
            ("Keras top-1, best epoch", lambda m: m["best_test_top1"]),
            # none for ReCU and BiPer (reste_larq.callbacks.frozen_fraction): nan
            (
                "last frozen fraction",
                lambda m: m["frozen_percent"] if "quoted" in m else 100.0 * frozen(m)[-1],
            ),
        ):
            print(f"\n{title} (%), {args.dataset}, {limit} training images, seeds {args.seeds}")
            print(f"{'variant':<32}" + "".join(f"{f'{e} ep':>10}" for e in args.epochs))
            for variant, *_ in variants:
                cells = [cell(results.get((limit, e, variant)), value) for e in args.epochs]
                print(f"{variant:<32}" + "".join(f"{c:>10}" for c in cells))
    for k, source in enumerate(sources):
        print(f"{'*' * (k + 1)} quoted from {args.quoted}: {source}")

    if not args.no_plot:
        plot(args, variants, results)


def add_quoted(args, parser, results) -> list[str]:
    """Put --quoted's cells into `results` where the grid has no run folder for them;
    returns their sources, in the order of their marks (*, **, ...)."""
    with open(args.quoted) as f:
        quoted = json.load(f)
    fields = {"variant", "train_limit", "epochs", "seed", "test_top1", "source"}
    sources, found = [], {}
    for n, entry in enumerate(quoted):
        missing = sorted(fields - set(entry))
        if missing:
            parser.error(f"{args.quoted}: cell {n} has no {', '.join(missing)}")
        key = (entry["train_limit"], entry["epochs"], entry["variant"])
        if entry["seed"] not in args.seeds or key[0] not in args.train_limits:
            continue
        if key[1] not in args.epochs or key[2] not in args.variants:
            continue
        if entry["source"] not in sources:
            sources.append(entry["source"])
        found.setdefault(key, []).append(
            {
                "test_top1": entry["test_top1"],
                "best_test_top1": entry.get("best_test_top1"),
                "frozen_percent": entry.get("frozen_percent"),
                "per_epoch": [],
                "quoted": "*" * (sources.index(entry["source"]) + 1),
            }
        )
    for key, cells in found.items():
        results.setdefault(key, cells)  # a run folder of the cell wins
    return sources


def cell(metrics, value) -> str:
    """A table cell: the mean over seeds, "-" where there is none (or a quoted cell
    lacks the figure), with a quoted cell's mark."""
    if not metrics:
        return "-"
    values = [value(m) for m in metrics]
    if any(v is None for v in values):
        return "-"
    mark = metrics[0].get("quoted", "")
    return f"{statistics.mean(values):.2f}{mark}"


def plot(args, variants, results):
    """One panel per training-set size (top-1 against the epoch budget, mean over
    seeds), and one of the longest finished run's epochs at the largest size: test
    top-1 (solid) and frozen fraction (dashed), the first seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(
        1, len(args.train_limits) + 1, figsize=(5 * (len(args.train_limits) + 1), 4), dpi=110
    )
    for ax, limit in zip(axes, args.train_limits):
        for k, (variant, *_) in enumerate(variants):
            epochs = [e for e in args.epochs if (limit, e, variant) in results]
            top1 = [
                statistics.mean(m["test_top1"] for m in results[(limit, e, variant)])
                for e in epochs
            ]
            ax.plot(epochs, top1, "-", color=f"C{k}", label=variant)
            for e, t in zip(epochs, top1):  # quoted cells (other runs, --quoted): open
                quoted = "quoted" in results[(limit, e, variant)][0]
                ax.plot(e, t, "o", color=f"C{k}", mfc="none" if quoted else f"C{k}")
        ax.set_xscale("log")
        ax.set_xticks(args.epochs, [str(e) for e in args.epochs])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("epochs (the whole schedule each)")
        ax.set_ylabel("Keras test top-1 (%)")
        ax.set_title(f"{args.dataset}, {limit} training images")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)

    ax = axes[-1]
    frozen_ax = ax.twinx()
    limit = next((n for n in reversed(args.train_limits) if any(k[0] == n for k in results)), None)
    longest = max((e for n, e, _ in results if n == limit), default=None)
    for k, (variant, *_) in enumerate(variants):
        runs = results.get((limit, longest, variant))
        if not runs or not runs[0]["per_epoch"]:  # none, or quoted without its epochs
            continue
        per_epoch = runs[0]["per_epoch"]
        x = [r["epoch"] + 1 for r in per_epoch]
        ax.plot(x, [100 * r["val_accuracy"] for r in per_epoch], "-", color=f"C{k}", label=variant)
        if not any(map(math.isnan, frozen(runs[0]))):  # none for ReCU, BiPer
            frozen_ax.plot(x, [100 * f for f in frozen(runs[0])], "--", color=f"C{k}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%), solid")
    frozen_ax.set_ylabel("frozen kernel weights (%), dashed")
    frozen_ax.set_ylim(0, 100)
    ax.set_title(f"the {longest}-epoch runs, {limit} images, seed {args.seeds[0]}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    path = args.plot or os.path.join(args.results_dir, "budget_sweep.png")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
