"""What deployment gains: LCE binary model vs. the same architecture in float.

    python benchmarks/deploy.py
    python benchmarks/deploy.py --models resnet20_1w1a birealnet18 --runs 20

For each model: the `.tflite` size from LCE (binary convs as LceBconv2d, bit-packed
weights) and from the stock TFLite converter on the float twin (`quantizer="float"`),
latency at batch 1 with 1 and 2 threads (median of --runs after warm-up; binary with
LCE's interpreter, float with TensorFlow's stock interpreter), and the weight memory
of the Keras model: 1 bit per binary weight (+ 32-bit float ones) vs. all float32,
and the size of `export.save_packed`'s file (the portable checkpoint of 1W32A nets).

On x86 LCE runs its *reference* kernels (correct, not optimized; the optimized ones are
for ARM), while the float model runs TFLite's optimized x86 kernels: x86 latency says
nothing about a phone or a Raspberry Pi. Sizes do not depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import reste_larq  # noqa: E402,F401  (first: TensorFlow with Keras 2 as tf.keras)

# isort: split
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from reste_larq import export, models  # noqa: E402

# The paper's head where it differs from the family's default.
CLASSES = {"wrn20_10_1bit": 100}


def latency_ms(predict, x, runs):
    predict(x)  # warm-up
    predict(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        predict(x)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def weight_bits(model):
    """Keras weight memory in bits: binary-quantized kernels at 1 bit, the rest 32."""
    bits = 0
    for w in model.weights:
        bits += int(np.prod(w.shape)) * getattr(w, "precision", 32)
    return bits


def float_interpreter(flatbuffer, threads):
    interpreter = tf.lite.Interpreter(model_content=flatbuffer, num_threads=threads)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]["index"]
    out = interpreter.get_output_details()[0]["index"]

    def predict(x):
        interpreter.set_tensor(inp, x)
        interpreter.invoke()
        return interpreter.get_tensor(out)

    return predict


def lce_interpreter(flatbuffer, threads):
    interpreter = export.interpreter(flatbuffer, threads)
    return lambda x: interpreter.predict(x)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--models",
        nargs="+",
        default=[
            "resnet20_1w1a",
            "resnet20_bireal_1w1a",
            "vgg_small_1w1a",
            "resnet18_1w1a",
            "birealnet18",
            "wrn20_10_1bit",
        ],
    )
    p.add_argument("--runs", type=int, default=15)
    args = p.parse_args(argv)

    on_arm = platform.machine() in ("aarch64", "arm64")
    print(
        f"{platform.machine()}, {os.cpu_count()} CPUs, TF {tf.__version__}, "
        f"LCE interpreter on {'ARM' if on_arm else 'x86 reference kernels'}"
    )
    header = (
        f"{'model':<24}{'LCE KiB':>9}{'float KiB':>11}{'size x':>8}"
        f"{'LCE ms 1t':>11}{'LCE ms 2t':>11}{'float ms 1t':>13}{'float ms 2t':>13}"
        f"{'packed KiB':>12}{'fp32 KiB':>10}{'weights x':>11}{'.npz KiB':>10}"
    )
    print(header)
    for name in args.models:
        classes = CLASSES.get(name)
        binary = models.build(name, num_classes=classes)
        floating = models.build(name, quantizer="float", num_classes=classes)
        lce_fb = export.convert(binary)
        float_fb = export.convert_float(floating)
        assert export.op_counts(lce_fb).get("LceBconv2d", 0) == export.count_binary_convs(binary)
        with tempfile.TemporaryDirectory() as tmp:
            export.save_packed(binary, os.path.join(tmp, "model.packed.npz"))
            npz = os.path.getsize(os.path.join(tmp, "model.packed.npz")) / 1024
        x = (
            np.random.default_rng(0)
            .standard_normal((1, *binary.input_shape[1:]))
            .astype(np.float32)
        )
        lce = [latency_ms(lce_interpreter(lce_fb, t), x, args.runs) for t in (1, 2)]
        flt = [latency_ms(float_interpreter(float_fb, t), x, args.runs) for t in (1, 2)]
        packed, fp32 = weight_bits(binary) / 8 / 1024, binary.count_params() * 4 / 1024
        print(
            f"{name:<24}{len(lce_fb) / 1024:>9.1f}{len(float_fb) / 1024:>11.1f}"
            f"{len(float_fb) / len(lce_fb):>8.1f}{lce[0]:>11.2f}{lce[1]:>11.2f}"
            f"{flt[0]:>13.2f}{flt[1]:>13.2f}{packed:>12.1f}{fp32:>10.1f}{fp32 / packed:>11.1f}"
            f"{npz:>10.1f}",
            flush=True,
        )
    print(
        "size x = float .tflite / LCE .tflite; weights x = fp32 Keras weights / packed "
        "(1-bit binary kernels); .npz = export.save_packed's file. Latency: median ms per "
        "image, batch 1. wrn20_10_1bit is 1W32A (LCE keeps its convs float) with the "
        "paper's CIFAR-100 head."
    )


if __name__ == "__main__":
    main()
