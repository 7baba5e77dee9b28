"""Multi-stage training: a float teacher, then binary stages distilled from it.

    python -m train.multistage --model resnet20_1w1a --quantizer reste \\
        --stages float,w32,1w1a --epochs-per-stage 2 --dataset fashion_mnist

The recipe of Real-to-Binary and ReActNet's two steps, on this project's pieces:

1. `float`: the full-precision twin of the model (`--quantizer float`), the teacher.
2. each binary stage (`w32`: real weights, binary activations; `a32`: 1W32A; `1w1a`)
   starts from the previous stage's last checkpoint (`--init-from`) and is distilled
   from the float stage (`--teacher`, loss of `--distill-weight` and
   `--distill-temperature`; `--distill-weight 0` trains on the labels alone).

Every stage is an ordinary run of `train.cifar` (its flags apply to every stage: the
optimizer, the LR schedule restarting per stage, the estimator's schedule, export) in
one folder, `--results-dir/--name/<i>_<stage>/`. Running the same command again
continues at the first unfinished stage (resuming it from its last epoch). At the end
it prints the stages' Keras and TFLite top-1 and writes them to stages.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys

import tensorflow as tf

from reste_larq import rundir
from reste_larq.config import FIELDS_ADDED_LATER, RUN_DEFINING
from train import cifar, common

# stage name -> the flags that make it
STAGES = {
    "float": {"quantizer": "float", "a32": False, "w32": False},
    "w32": {"a32": False, "w32": True},
    "a32": {"a32": True, "w32": False},
    "1w1a": {"a32": False, "w32": False},
}
# The stage's own settings, which the multi-stage command sets: not for the user.
_SET_PER_STAGE = ("init_from", "teacher", "a32", "w32", "evaluate")
STATE_FILE = "multistage.json"


def _stage_list(text):
    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise argparse.ArgumentTypeError(
            f"unknown stage(s) {', '.join(unknown) or '(none)'}; "
            f"choose a comma-separated list of {', '.join(STAGES)}"
        )
    if "float" in stages[1:]:
        raise argparse.ArgumentTypeError("float can only be the first stage (the teacher)")
    if len(set(stages)) != len(stages):
        raise argparse.ArgumentTypeError(f"a stage appears twice in {text!r}")
    return stages


def build_parser():
    p = cifar.build_parser()
    p.prog = "python -m train.multistage"
    p.description = __doc__.splitlines()[0]
    g = p.add_argument_group("multi-stage")
    g.add_argument(
        "--stages",
        type=_stage_list,
        default=["float", "w32", "1w1a"],
        help=f"comma-separated stages from {', '.join(STAGES)} (float first, if at all)",
    )
    g.add_argument(
        "--epochs-per-stage",
        type=common._positive_int,
        nargs="+",
        default=None,
        metavar="EPOCHS",
        help="one count for every stage, or one per stage (default: --epochs each)",
    )
    return p


def stage_plan(args):
    """[(stage, folder name, epochs)], checked against --stages."""
    epochs = args.epochs_per_stage or [args.epochs]
    if len(epochs) == 1:
        epochs = epochs * len(args.stages)
    if len(epochs) != len(args.stages):
        raise common.UsageError(
            f"--epochs-per-stage: {len(epochs)} counts for {len(args.stages)} stages "
            f"({','.join(args.stages)}); give one count or one per stage"
        )
    return [(s, f"{i + 1}_{s}", e) for i, (s, e) in enumerate(zip(args.stages, epochs))]


def _stage_args(args, stage, epochs, directory, previous, teacher):
    stage_args = copy.deepcopy(args)
    for key, value in STAGES[stage].items():
        setattr(stage_args, key, value)
    stage_args.epochs = epochs
    stage_args.results_dir, stage_args.name = os.path.split(directory)
    stage_args.init_from = previous
    stage_args.teacher = teacher if stage != "float" else None
    stage_args.evaluate = None
    if stage_args.warmup and stage_args.warmup >= epochs:
        stage_args.warmup = 0  # a stage shorter than the warm-up: no warm-up
    return stage_args


def run(args) -> list[dict]:
    given = [f"--{k.replace('_', '-')}" for k in _SET_PER_STAGE if getattr(args, k)]
    if given:
        raise common.UsageError(
            f"{', '.join(given)}: the multi-stage command sets these per stage "
            "(choose stages with --stages; re-running the command resumes it)"
        )
    resolved = common.config(args)
    # resolved once for every stage (and the saved settings): "auto" precision too
    args.quantizer, args.lr, args.lr_schedule, args.mixed_precision = (
        resolved.quantizer,
        resolved.lr,
        resolved.lr_schedule,
        resolved.mixed_precision,
    )
    if args.quantizer == "float" and set(args.stages) - {"float"}:
        raise common.UsageError("--quantizer float: the binary stages need an estimator")
    plan = stage_plan(args)
    name = args.name or f"{args.model}_{args.quantizer}_{args.dataset}_multistage"
    folder = os.path.join(args.results_dir, name)
    # What defines the run (the flags train.cifar checks on --resume, and the stages);
    # output-only flags (--verbose, --export, --data-dir, ...) may change between calls.
    defining = (*RUN_DEFINING, "stages", "epochs_per_stage")
    settings = {k: getattr(args, k) for k in sorted(defining) if hasattr(args, k)}
    state_path = os.path.join(folder, STATE_FILE)
    if os.path.exists(state_path):
        with open(state_path) as f:
            saved = json.load(f)
        # a flag newer than the saved run: the value that run had
        saved = {k: saved.get(k, FIELDS_ADDED_LATER.get(k)) for k in settings}
        changed = sorted(k for k in settings if saved[k] != settings[k])
        if changed:
            raise common.UsageError(
                f"{folder} holds a multi-stage run with other settings "
                f"({', '.join('--' + k.replace('_', '-') for k in changed)}); "
                "use another --name to start a new one"
            )
        print(f"continuing the multi-stage run in {folder}", flush=True)
    elif os.path.exists(folder) and os.listdir(folder):
        raise common.UsageError(f"{folder} already holds something that is not a multi-stage run")
    os.makedirs(folder, exist_ok=True)
    rundir.write_json(state_path, settings)

    rows, previous, teacher = [], None, None
    for stage, stage_name, epochs in plan:
        directory = os.path.join(folder, stage_name)
        stage_args = _stage_args(args, stage, epochs, directory, previous, teacher)
        metrics_path = os.path.join(directory, "metrics.json")
        if os.path.isfile(metrics_path):
            print(f"stage {stage_name}: finished earlier", flush=True)
            metrics = rundir.read_json(metrics_path)
        else:
            checkpoint = tf.train.latest_checkpoint(os.path.join(directory, "checkpoint"))
            if checkpoint is None and os.path.isdir(directory):
                # Killed before its first epoch ended: nothing to keep.
                shutil.rmtree(directory)
            stage_args.resume = checkpoint is not None
            print(f"\n=== stage {stage_name}: {epochs} epochs ===", flush=True)
            metrics = common.run(stage_args, cifar.load_data)
        rows.append({"stage": stage_name, **_row(metrics)})
        previous = directory
        if stage == "float":
            teacher = directory
    rundir.write_json(os.path.join(folder, "stages.json"), rows)
    print_table(rows, folder)
    return rows


def _row(metrics):
    keys = ("test_top1", "tflite_test_top1", "tflite_lce_bconv2d", "tflite_bytes", "epochs")
    return {k: metrics.get(k) for k in keys}


def print_table(rows, folder):
    print(f"\n{folder}")
    print(f"{'stage':<10}{'epochs':>7}{'Keras top-1':>13}{'TFLite top-1':>14}{'LceBconv2d':>12}")
    for r in rows:
        tflite = "-" if r["tflite_test_top1"] is None else f"{r['tflite_test_top1']:.2f}"
        bconv = "-" if r["tflite_lce_bconv2d"] is None else str(r["tflite_lce_bconv2d"])
        print(f"{r['stage']:<10}{r['epochs']:>7}{r['test_top1']:>13.2f}{tflite:>14}{bconv:>12}")


def main(argv=None) -> int:
    args = common.parse(build_parser(), argv)
    try:
        run(args)
    except common.ONE_LINE_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    common.filter_cpp_logs()  # XLA's and the runtime's C++ log lines (TF_CPP_MIN_LOG_LEVEL)
    sys.exit(main())
