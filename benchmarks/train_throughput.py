"""Training throughput of each estimator: images/s of `model.fit` on resnet20_1w1a.

    python benchmarks/train_throughput.py                 # batch 128, 5 rounds
    python benchmarks/train_throughput.py --rounds 9 --steps 20
    python benchmarks/train_throughput.py --estimators reste reste+jit reste+bf16 float
    python benchmarks/train_throughput.py --estimators reste float \
        --pythons .venv-tf215/bin/python .venv/bin/python    # two stacks, interleaved
    python benchmarks/train_throughput.py --estimators reste float \
        --xla-cpu-runtimes thunk legacy          # XLA's two CPU runtimes, interleaved

A variant is an estimator name ("float": the full-precision twin) with options: +jit
(`model.compile(jit_compile=True)`, the CLI's --jit-compile), +bf16 / +fp16 (Keras
mixed precision, the CLI's --mixed-precision), +padcopy (one-padding trained through
Larq's padded copy, `OnePaddedQuantConv2D.decompose_padding = False`), +larqste
(Larq's `SteSign` wherever the model has `FusedSteSign`: ste, bnnpp and wrn_sign as
they trained before the fused backward; the same values), +xla (the estimators' XLA
backward kernels instead of the native ones, `RESTE_LARQ_NATIVE=0` while the model is
traced: the code before reste_larq.native; the same values), +larqsign (the
training forward's sign as Larq's three ops, not the native `BinarySign`: the code
before it; the same values), +scatteradd (the one-padded convs' border term forward by
TensorFlow's scatter and add, not the native in-place `AddAtBorder`: the code before it;
the same values), +kd (a
`reste_larq.distill.Distiller` with the float twin as its teacher: the cost of
`--teacher`), +a32 (real activations, binary kernels: what the kernel's quantizer and
weight scale cost) or +w32 (real kernels, binary one-padded activations: what
binarizing the activations costs), +zeropad (zero padding, as the PyTorch reference:
no one-padding border term). "floor" is no estimator but a bound: the float twin
with the cheapest binarization TensorFlow ops allow on every binary conv's input (one
`Sign` forward, one `Mul` backward; zero padding, float kernels), so floor/float is the
most any estimator with a backward pass can reach without kernels fused into the
convolution or BatchNorm. Every model is compiled as the CLI
compiles it: PyTorch-form SGD (momentum 0.9, coupled weight decay 1e-4).

All estimators run in one process, each model compiled and warmed up first (tracing
excluded), then timed in interleaved rounds (the order shuffled each round) so that
drifts of the machine hit every estimator alike. Prints median and min-max images/s
per estimator and, last, `reste/ste throughput ratio: X.XX` (the ratio of medians).
Synthetic 32x32x3 inputs: throughput does not depend on pixel values.

`--xla-cpu-runtimes` compares XLA's CPU runtimes the same way (fresh processes of this
interpreter, one per runtime and round, with XLA_FLAGS=--xla_cpu_use_thunk_runtime=
true or false): XLA reads its flags once per process.

`--pythons` compares environments (e.g. two TensorFlow stacks): each round runs this
script once in a fresh process of every interpreter in turn (the order shuffled each
round), each process warming up and timing every estimator once; the table then has
one row per interpreter and estimator.

tf.data autotuning is off for the timed dataset: with it on, each `fit` ends by
waiting for the autotune thread's next wake-up when its iterator is deleted (0-0.5 s
after the last step here), which rounds every short fit up to a fixed period and made
the same model measure 754 or 376 img/s from call to call.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import time

import reste_larq  # noqa: E402,F401  (first: TensorFlow with Keras 2 as tf.keras)

# isort: split
import larq as lq  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from reste_larq import distill, layers, models, training  # noqa: E402
from reste_larq import quantizers as Q  # noqa: E402

DEFAULT_ESTIMATORS = ["ste", "reste", "bnnpp", "binary_connect", "bnn+", "approx_sign"]
POLICIES = {"bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
XLA_CPU_RUNTIMES = {
    "thunk": "--xla_cpu_use_thunk_runtime=true",
    "legacy": "--xla_cpu_use_thunk_runtime=false",
}


def split_variant(variant):
    """ "reste+jit+bf16" -> ("reste", ["jit", "bf16"]); "bnn+" keeps its own "+"."""
    options = []
    while True:
        for option in (
            "jit",
            "kd",
            "padcopy",
            "larqste",
            "xla",
            "larqsign",
            "scatteradd",
            "zeropad",
            "a32",
            "w32",
            *POLICIES,
        ):
            if variant.endswith("+" + option):
                options.insert(0, option)
                variant = variant[: -len(option) - 1]
                break
        else:
            return variant, options


@tf.custom_gradient
def _floor_sign(x):
    """The least a binarizing estimator with a backward pass adds to its float twin: one
    TensorFlow op forward (Sign) and one backward (a Mul over the input). Its values are
    not any estimator's (sign(0) = 0; gradient dy * x): it measures a cost, not a method."""
    return tf.sign(x), lambda dy: dy * x


@contextlib.contextmanager
def kernels_for(variant):
    """+xla: RESTE_LARQ_NATIVE=0 while the variant's model is built and its step traced
    (the quantizers choose their kernels when the step is traced); +larqsign: the
    training forward's sign as Larq's three TensorFlow ops instead of the native one-pass
    `BinarySign` (the same values)."""
    options = split_variant(variant)[1]
    before = os.environ.get("RESTE_LARQ_NATIVE")
    binary_sign = Q.binary_sign
    if "xla" in options:
        os.environ["RESTE_LARQ_NATIVE"] = "0"
    if "larqsign" in options:
        Q.binary_sign = lambda x, training=None: lq.math.sign(x)
    try:
        yield
    finally:
        Q.binary_sign = binary_sign
        if before is None:
            os.environ.pop("RESTE_LARQ_NATIVE", None)
        else:
            os.environ["RESTE_LARQ_NATIVE"] = before


def make_model(variant, model_name):
    estimator, options = split_variant(variant)
    policy = next((POLICIES[o] for o in options if o in POLICIES), "float32")
    tf.keras.mixed_precision.set_global_policy(policy)
    try:
        floor = estimator == "floor"
        model = models.build(
            model_name,
            quantizer="float" if floor else estimator,
            a32="a32" in options or None,
            w32="w32" in options,
            padding="zero" if "zeropad" in options else "one",
        )
        if floor:  # the float twin with the cheapest possible binarization of its inputs
            for layer in model.submodules:
                if isinstance(layer, lq.layers.QuantConv2D):
                    layer.input_quantizer = _floor_sign
        if "larqste" in options:  # Larq's SteSign, unfused, where "ste" is FusedSteSign
            for layer in model.submodules:
                for attr in ("input_quantizer", "kernel_quantizer"):
                    q = getattr(layer, attr, None)
                    owner = q if isinstance(q, Q.MeanAbsScaled) else layer
                    name = "quantizer" if owner is q else attr
                    inner = getattr(owner, name, None)
                    if isinstance(inner, Q.FusedSteSign):
                        setattr(owner, name, lq.quantizers.SteSign(clip_value=inner.clip_value))
        if "padcopy" in options:  # one-padding as Larq's tf.pad copy, also in training
            for layer in model.submodules:
                if isinstance(layer, layers.OnePaddedQuantConv2D):
                    layer.decompose_padding = False
        if "scatteradd" in options:  # the border term by TensorFlow's scatter and add
            for layer in model.submodules:
                if isinstance(layer, layers.OnePaddedQuantConv2D):
                    layer.add_border_in_place = False
        if "kd" in options:  # the teacher's weights do not matter for the cost
            teacher = models.build(model_name, quantizer="float")
            model = distill.Distiller(model, teacher, alpha=1.0, temperature=1.0)
        model.compile(
            optimizer=training.TorchSGD(0.1, momentum=0.9, coupled_weight_decay=1e-4),
            loss=training.sparse_cross_entropy(10),
            jit_compile="jit" in options,
        )
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20_1w1a")
    p.add_argument("--estimators", nargs="+", default=DEFAULT_ESTIMATORS)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=15, help="batches per timed fit")
    p.add_argument("--rounds", type=int, default=5, help="timed fits per estimator (>= 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--pythons",
        nargs="+",
        default=None,
        help="interpreters (environments) to compare, interleaved round by round",
    )
    p.add_argument(
        "--xla-cpu-runtimes",
        nargs="+",
        choices=sorted(XLA_CPU_RUNTIMES),
        default=None,
        help="XLA CPU runtimes to compare, interleaved round by round",
    )
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # for --pythons
    args = p.parse_args(argv)
    if args.pythons or args.xla_cpu_runtimes:
        return compare_environments(args, argv if argv is not None else sys.argv[1:])

    rng = np.random.default_rng(args.seed)
    images = rng.standard_normal((args.batch_size * args.steps, 32, 32, 3), dtype=np.float32)
    labels = rng.integers(0, 10, len(images))
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(args.batch_size).cache()
    options = tf.data.Options()
    options.autotune.enabled = False  # see the module docstring
    data = data.with_options(options)

    compiled = {}
    for name in args.estimators:
        with kernels_for(name):
            compiled[name] = make_model(name, args.model)
            compiled[name].fit(data, epochs=1, verbose=0)  # trace + warm up

    rates = {name: [] for name in args.estimators}
    order = list(args.estimators)
    shuffle = random.Random(args.seed)
    for _ in range(args.rounds):
        shuffle.shuffle(order)
        for name in order:
            start = time.perf_counter()
            compiled[name].fit(data, epochs=1, verbose=0)
            rates[name].append(len(images) / (time.perf_counter() - start))

    if args.json:
        print(json.dumps({"tensorflow": tf.__version__, "rates": rates}))
        return rates
    print(
        f"model {args.model}, batch {args.batch_size}, {args.steps} steps x {args.rounds} "
        f"interleaved rounds, {os.cpu_count()} CPUs, TF {tf.__version__}"
    )
    print(f"{'estimator':<16}{'median img/s':>14}{'min':>10}{'max':>10}")
    medians = {}
    for name in args.estimators:
        medians[name] = statistics.median(rates[name])
        print(f"{name:<16}{medians[name]:>14.1f}{min(rates[name]):>10.1f}{max(rates[name]):>10.1f}")
    for name in args.estimators:
        base = split_variant(name)[0]
        if name != "reste" and "reste" in medians and (base == "reste" or name == "float"):
            print(f"{name}/reste throughput ratio: {medians[name] / medians['reste']:.2f}")
    if "reste" in medians and "ste" in medians:
        print(f"reste/ste throughput ratio: {medians['reste'] / medians['ste']:.2f}")
    return medians


def compare_environments(args, argv):
    """--pythons / --xla-cpu-runtimes: one fresh process per environment and round, in a
    shuffled order."""
    skip = {
        "--pythons",
        "--xla-cpu-runtimes",
        *(args.pythons or ()),
        *(args.xla_cpu_runtimes or ()),
    }
    child = [a for a in argv if a not in skip] + ["--rounds", "1", "--json"]
    # This process's `import reste_larq` set TF_USE_LEGACY_KERAS and, on TensorFlow 2.19,
    # XLA_FLAGS; each interpreter's own import decides for its stack (TensorFlow 2.15
    # must see neither: it has no tf-keras, and its XLA aborts on the 2.19 flag).
    base = {k: v for k, v in os.environ.items() if k not in ("TF_USE_LEGACY_KERAS", "XLA_FLAGS")}
    if args.xla_cpu_runtimes:
        envs = {
            f"XLA {r} runtime": (sys.executable, {**base, "XLA_FLAGS": XLA_CPU_RUNTIMES[r]})
            for r in args.xla_cpu_runtimes
        }
    else:
        envs = {python: (python, base) for python in args.pythons}
    rates = {label: {name: [] for name in args.estimators} for label in envs}
    versions = {}
    order = list(envs)
    shuffle = random.Random(args.seed)
    for round_ in range(args.rounds):
        shuffle.shuffle(order)
        for label in order:
            python, env = envs[label]
            print(f"round {round_ + 1}/{args.rounds}: {label}", flush=True)
            done = subprocess.run(
                [python, os.path.abspath(__file__), *child],
                capture_output=True,
                text=True,
                env=env,
            )
            if done.returncode:
                sys.exit(f"{label} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            versions[label] = result["tensorflow"]
            for name, values in result["rates"].items():
                rates[label][name] += values
    print(
        f"model {args.model}, batch {args.batch_size}, {args.steps} steps, {args.rounds} "
        f"interleaved rounds of one process per environment, {os.cpu_count()} CPUs"
    )
    print(
        f"{'environment':<28}{'TF':>8} {'estimator':<16}{'median img/s':>14}{'min':>10}{'max':>10}"
    )
    medians = {}
    for label in envs:
        for name in args.estimators:
            r = rates[label][name]
            medians[label, name] = statistics.median(r)
            print(
                f"{label:<28}{versions[label]:>8} {name:<16}{medians[label, name]:>14.1f}"
                f"{min(r):>10.1f}{max(r):>10.1f}"
            )
    first, *others = envs
    for label in others:
        for name in args.estimators:
            ratio = medians[label, name] / medians[first, name]
            print(f"{name}: {label} / {first} throughput ratio: {ratio:.2f}")
    return medians


if __name__ == "__main__":
    main()
