"""Where a training step's time goes: TensorFlow's profiler over `model.fit` steps, op
types totalled per step, variants side by side.

    python benchmarks/profile_step.py                            # reste vs its float twin
    python benchmarks/profile_step.py --variants reste ste bnnpp float --steps 20
    python benchmarks/profile_step.py --trace-dir results/profile   # keep the traces

Each variant (as in train_throughput.py: an estimator name, "float", +jit/+bf16) is
compiled as the CLI compiles it, warmed up (tracing excluded), then `--steps` batches
of one `fit` are profiled. The trace (`*.xplane.pb`, readable by TensorBoard's profile
plugin) is parsed here: every op the executor ran on the CPU is `node:Type`; its time
is summed per type and divided by the steps. Ops run on two inter-op threads at once,
so the column total is op time, more than wall time. XLA-compiled functions are one
row, their async launches (either XLA runtime); under XLA's thunk runtime their events
on XLA's threads are shown too, as a row "of which" that the total leaves out (every
one of them lies inside a launch: 216 of 216 in a 2-step trace of reste, 2026-12-06).
The last column is the first variant minus the last (e.g. reste - float): the binary
model's extra time per step, op type by op type.
Synthetic 32x32x3 inputs, tf.data autotuning off (see train_throughput.py).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import sys
import tempfile
import time

import reste_larq  # noqa: F401  (first: TensorFlow with Keras 2 as tf.keras)

# isort: split
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import kernels_for, make_model  # noqa: E402

# Executor bookkeeping events that wrap ops rather than being ops.
_NOT_OPS = ("ExecutorState::", "ThreadpoolListener::")


# Under XLA's thunk runtime: time on XLA's own threads, inside the async launches
XLA_THREADS = "(of which XLA threads, thunk)"


def op_type_times(xplane_path: str) -> collections.Counter:
    """Picoseconds per op type, summed over the executor threads of the host plane."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(xplane_path, "rb") as f:
        space.ParseFromString(f.read())
    totals = collections.Counter()
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        names = plane.event_metadata
        for line in plane.lines:
            if line.name.startswith("host_executor"):
                # XLA-compiled functions (the estimators' jit backward) run here under
                # XLA's thunk runtime; their calls nest fusions inside: count each
                # outermost event once.
                end = -1
                for event in sorted(line.events, key=lambda e: e.offset_ps):
                    if event.offset_ps >= end:
                        totals[XLA_THREADS] += event.duration_ps
                        end = event.offset_ps + event.duration_ps
                continue
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = names[event.metadata_id].name
                if name == "ExecutorState::ProcessAsync::Start":
                    # Async kernels: the XLA-compiled functions, which run inside this
                    # event (under the legacy runtime, what `import reste_larq` selects
                    # on TF 2.19, they log no event of their own); otherwise the input
                    # pipeline's IteratorGetNext (~0.06 ms per step here).
                    totals["async ops (XLA functions)"] += event.duration_ps
                    continue
                if ":" not in name or name.startswith(_NOT_OPS):
                    continue
                totals[name.rsplit(":", 1)[1]] += event.duration_ps
    return totals


def profile(variant, model_name, data, steps, trace_dir):
    with kernels_for(variant):
        model = make_model(variant, model_name)
        model.fit(data.take(2), epochs=1, verbose=0)  # trace + warm up
    model.fit(data.take(2), epochs=1, verbose=0)
    logdir = os.path.join(trace_dir, variant.replace("+", "_"))
    tf.profiler.experimental.start(logdir)
    start = time.perf_counter()
    model.fit(data.take(steps), epochs=1, verbose=0)
    wall = time.perf_counter() - start
    tf.profiler.experimental.stop()
    path = max(
        glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime
    )
    return op_type_times(path), wall / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20_1w1a")
    p.add_argument("--variants", nargs="+", default=["reste", "float"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="profiled steps per variant")
    p.add_argument("--top", type=int, default=20, help="op types shown (by the largest time)")
    p.add_argument("--trace-dir", default=None, help="keep the traces here (default: a temp dir)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.top < 1:
        p.error("--steps and --top must be >= 1")

    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch_size * 4, 32, 32, 3), dtype=np.float32)
    labels = rng.integers(0, 10, len(images))
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(args.batch_size)
    data = data.cache().repeat()
    options = tf.data.Options()
    options.autotune.enabled = False
    data = data.with_options(options)

    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="profile_step_")
    times, walls = {}, {}
    for variant in args.variants:
        times[variant], walls[variant] = profile(variant, args.model, data, args.steps, trace_dir)

    per_step = {v: {k: t / args.steps / 1e9 for k, t in times[v].items()} for v in args.variants}
    every = collections.Counter()
    for v in args.variants:
        for k, ms in per_step[v].items():
            every[k] = max(every[k], ms)
    first, last = args.variants[0], args.variants[-1]
    diff = len(args.variants) > 1
    print(
        f"model {args.model}, batch {args.batch_size}, {args.steps} profiled steps per variant, "
        f"{os.cpu_count()} CPUs, TF {tf.__version__}; ms of op time per step"
    )
    header = f"{'op type':<34}" + "".join(f"{v:>14}" for v in args.variants)
    print(header + (f"{first + ' - ' + last:>18}" if diff else ""))
    for k, _ in every.most_common(args.top):
        row = f"{k:<34}" + "".join(f"{per_step[v].get(k, 0.0):>14.2f}" for v in args.variants)
        if diff:
            row += f"{per_step[first].get(k, 0.0) - per_step[last].get(k, 0.0):>18.2f}"
        print(row)
    shown = {k for k, _ in every.most_common(args.top)}
    rest = {
        v: sum(ms for k, ms in per_step[v].items() if k not in shown | {XLA_THREADS})
        for v in args.variants
    }
    print(f"{'(other op types)':<34}" + "".join(f"{rest[v]:>14.2f}" for v in args.variants))
    # XLA's thread events lie inside the async launches, already counted
    total = {v: sum(ms for k, ms in per_step[v].items() if k != XLA_THREADS) for v in args.variants}
    row = f"{'op time per step':<34}" + "".join(f"{total[v]:>14.2f}" for v in args.variants)
    print(row + (f"{total[first] - total[last]:>18.2f}" if diff else ""))
    print(f"{'wall ms per step':<34}" + "".join(f"{walls[v] * 1e3:>14.2f}" for v in args.variants))
    print(f"traces: {trace_dir}")
    return per_step


if __name__ == "__main__":
    main()
