"""Does the same train step give the same weights? Runs of one model from the same
initial weights on the same batch, compared bit for bit after every step.

    python benchmarks/determinism.py                    # both settings, Bi-Real-18 224 px
    python benchmarks/determinism.py --model resnet20_1w1a --runs 6

Each setting runs in a fresh process (the inter-op thread count is fixed when
TensorFlow's runtime starts): "default" (TensorFlow's thread pools as they come) and
"deterministic" (`reste_larq.distribute.make_deterministic()`). For each it prints the
number of runs whose weights left run 0's, the first step where they did, and the
variables that differed there (largest |difference|).
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_setting(args):
    sys.path.insert(0, ROOT)
    import reste_larq  # noqa: F401  (first: Keras 2 as tf.keras)
    from reste_larq import distribute, models, training

    if args.setting == "deterministic":
        distribute.make_deterministic()
    import numpy as np
    import tensorflow as tf

    size = 224 if args.model.startswith(("birealnet", "resnet18_1w1a_imagenet", "resnet34")) else 32
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, size, size, 3)).astype("float32")
    y = np.arange(args.batch) % 10
    tf.keras.utils.set_random_seed(1)
    initial = models.build(args.model, num_classes=1000).get_weights()
    runs = []
    for _ in range(args.runs):
        model = models.build(args.model, num_classes=1000)
        model.set_weights(initial)
        model.compile(
            training.TorchSGD(0.1, 0.9, args.weight_decay),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        steps = []
        for _ in range(args.steps):
            model.train_on_batch(x, y)
            steps.append([(w.name, w.numpy()) for w in model.weights])
        runs.append(steps)
    differing, first = 0, []
    for run in runs[1:]:
        for step, (mine, theirs) in enumerate(zip(run, runs[0])):
            diff = [
                (name, float(np.abs(a - b).max()))
                for (name, a), (_, b) in zip(mine, theirs)
                if not np.array_equal(a, b)
            ]
            if diff:
                differing += 1
                first.append({"step": step, "variables": diff[:3]})
                break
    print(json.dumps({"setting": args.setting, "differing_runs": differing, "first": first}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="birealnet18")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--weight-decay", type=float, default=5e-5)
    parser.add_argument("--setting", choices=("default", "deterministic"))
    args = parser.parse_args(argv)
    if args.setting:
        return one_setting(args)
    print(
        f"{args.model}: {args.runs} runs x {args.steps} steps, batch {args.batch}, "
        f"coupled weight decay {args.weight_decay}"
    )
    for setting in ("default", "deterministic"):
        out = (
            subprocess.run(
                [sys.executable, __file__, *(argv or sys.argv[1:]), "--setting", setting],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        result = json.loads(out)
        print(
            f"{setting:>13}: {result['differing_runs']} of {args.runs - 1} runs left run 0's "
            f"weights; first: {result['first'][:2]}"
        )


if __name__ == "__main__":
    main()
