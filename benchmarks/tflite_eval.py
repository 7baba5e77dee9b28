"""Images/s of LCE's Python interpreter on a `.tflite`, per setting, and whether every
setting gives the same predictions.

    python benchmarks/tflite_eval.py --tflite results/RUN/model.tflite
    python benchmarks/tflite_eval.py --tflite results/RUN/model.tflite --images 2000 \
        --settings t1 t2 t2+xnnpack t2+indirect --chunks 64 1000

A setting is `t<threads>` with options: +xnnpack (TFLite's XNNPACK delegate for the
float ops), +indirect (LCE's indirect-BGEMM LceBconv2d kernel), +reference (LCE's
reference LceBconv2d). `--chunks` is how many images one `Interpreter.predict` call is
given (the CLI hands it its evaluation batches): the interpreter itself runs one image
at a time, since LCE converts a Keras model's open batch dimension to 1, so this only
measures the Python overhead per call.

The images are the test split of the run's dataset (`args.json` beside the `.tflite`
names it and its normalization; Fashion-MNIST from Debian's dataset-fashion-mnist
without one), the first `--images` of them. Rounds are interleaved, the order shuffled
each round; prints median and min-max images/s per setting and chunk, the ratio to
the first setting, and per setting the predictions that differ from the first
setting's (argmax), the largest |logit difference| and top-1.

This runs LCE's x86 build: the fast LceBconv2d kernels are ARM's; on x86 these figures
are the time an evaluation takes here, not a deployment speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import statistics
import time

import reste_larq  # noqa: E402,F401  (first: TensorFlow with Keras 2 as tf.keras)

# isort: split
import numpy as np  # noqa: E402

from reste_larq import experiment  # noqa: E402
from reste_larq.config import RunConfig  # noqa: E402
from reste_larq.rundir import RunFolder  # noqa: E402

OPTIONS = {
    "xnnpack": "use_xnnpack",
    "indirect": "use_indirect_bgemm",
    "reference": "use_reference_bconv",
}


def parse_setting(name: str) -> dict:
    head, *opts = name.split("+")
    if not (head.startswith("t") and head[1:].isdigit() and int(head[1:]) >= 1):
        raise SystemExit(
            f"error: setting {name!r}: expected t<threads>[+option...], e.g. t2+xnnpack"
        )
    kwargs = {"num_threads": int(head[1:])}
    for opt in opts:
        if opt not in OPTIONS:
            raise SystemExit(
                f"error: setting {name!r}: unknown option {opt!r}; choose from {sorted(OPTIONS)}"
            )
        kwargs[OPTIONS[opt]] = True
    return kwargs


def load_images(tflite_path: str, limit: int, data_dir: str | None):
    """The first `limit` test images as the CLI evaluates them (`experiment.
    small_image_data`), with the run's settings where `args.json` is beside the file."""
    folder = RunFolder(os.path.dirname(os.path.abspath(tflite_path)))
    if os.path.isfile(folder.file("args.json")):
        config = folder.saved_config()
    else:
        config = RunConfig(dataset="fashion_mnist")
    config = dataclasses.replace(
        config, test_limit=limit, download=False, data_dir=data_dir or config.data_dir
    )
    batches = list(experiment.small_image_data(config, train=False).eval_ds.as_numpy_iterator())
    images = np.concatenate([x for x, _ in batches]).astype(np.float32)
    return config.dataset, images, np.concatenate([y for _, y in batches]).reshape(-1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tflite", required=True, help="a converted model (e.g. a run's model.tflite)")
    p.add_argument(
        "--settings", nargs="+", default=["t2", "t1", "t2+xnnpack", "t1+xnnpack", "t2+indirect"]
    )
    p.add_argument("--chunks", type=int, nargs="+", default=[64], help="images per predict call")
    p.add_argument("--images", type=int, default=1000, help="test images per measurement")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0, help="of the round order")
    args = p.parse_args(argv)

    import larq_compute_engine as lce

    with open(args.tflite, "rb") as f:
        flatbuffer = f.read()
    kwargs = {name: parse_setting(name) for name in args.settings}
    dataset, images, labels = load_images(args.tflite, args.images, args.data_dir)
    print(f"{args.tflite}: {len(images)} {dataset} test images, {args.rounds} interleaved rounds")

    interpreters = {name: lce.testing.Interpreter(flatbuffer, **kw) for name, kw in kwargs.items()}
    logits = {
        name: np.asarray(it.predict(images[:1])) for name, it in interpreters.items()
    }  # warm-up
    cells = [(name, chunk) for name in args.settings for chunk in args.chunks]
    rates = {cell: [] for cell in cells}
    rng = random.Random(args.seed)
    for r in range(args.rounds):
        order = cells[:]
        rng.shuffle(order)
        for name, chunk in order:
            it = interpreters[name]
            start = time.perf_counter()
            out = [
                np.asarray(it.predict(images[i : i + chunk])) for i in range(0, len(images), chunk)
            ]
            rates[(name, chunk)].append(len(images) / (time.perf_counter() - start))
            logits[name] = np.concatenate(out)
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    first = cells[0]
    base = statistics.median(rates[first])
    print("\n| setting | images per call | median img/s (min-max) | x first |")
    print("| --- | --- | --- | --- |")
    for cell in cells:
        v = rates[cell]
        med = statistics.median(v)
        print(
            f"| {cell[0]} | {cell[1]} | {med:.1f} ({min(v):.1f}-{max(v):.1f}) | {med / base:.2f} |"
        )
    ref = logits[args.settings[0]]
    print(f"\n| setting | argmax differing from {args.settings[0]} | max abs logit diff | top-1 |")
    print("| --- | --- | --- | --- |")
    for name in args.settings:
        diff = int(np.sum(np.argmax(logits[name], -1) != np.argmax(ref, -1)))
        gap = float(np.max(np.abs(logits[name] - ref)))
        top1 = 100.0 * float(np.mean(np.argmax(logits[name], -1) == labels))
        print(f"| {name} | {diff} / {len(ref)} | {gap:.3g} | {top1:.2f} |")


if __name__ == "__main__":
    main()
