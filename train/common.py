"""The shared training CLI: flags, run directory, fit assembly, export, metrics.json.

data -> model -> compile -> fit (callbacks) -> export (LCE) -> evaluate (Keras, TFLite)
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf

from reste_larq import callbacks as cb
from reste_larq import export, models, training
from reste_larq._tensorflow import filter_cpp_logs  # noqa: F401  (for the CLI modules)
from reste_larq.data import DATASETS, with_mean_std
from reste_larq.distill import Distiller
from reste_larq.errors import ConfigError, DataFormatError, DataNotFoundError
from reste_larq.models.blocks import BLOCKS, DOWNSAMPLES
from reste_larq.quantizers import canonical_estimator, estimators

PRECISION_POLICIES = {"off": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}
ADAM_LR = 1e-3  # Adam's usual rate in the Bi-Real / BNN-tricks recipes


class UsageError(Exception):
    """Bad command line or run state: printed as one line, exit code 2."""


# ------------------------------------------------------------------------- flags
def _positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer (got {text})")
    return value


def _non_negative_float(text):
    value = float(text)
    if not np.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (got {text})")
    return value


def _positive_float(text):
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {text})")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones (those flags explain their default in words)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), like the run's own errors."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def parser(description, *, prog, models, datasets, defaults, model_defaults=None):
    """argparse with the ReSTE reference's flags, in groups; `defaults` holds the
    recipe's values, `prog` how the CLI is run (python -m train.cifar), and
    `model_defaults` a model's own recipe ({model: {flag: value}}), taken by `parse`
    for the flags the command line leaves unset."""
    epilog = "".join(
        f"--model {name} defaults to its own recipe: "
        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in recipe.items())
        + ". "
        for name, recipe in (model_defaults or {}).items()
    )
    p = _OneLineErrorParser(
        prog=prog, description=description, formatter_class=_HelpFormatter, epilog=epilog
    )
    p.model_defaults = model_defaults or {}

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=defaults["dataset"], choices=datasets, help="dataset")
    g.add_argument(
        "--data-dir",
        default=None,
        help="TFDS data_dir, or a folder with the official offline files",
    )
    g.add_argument(
        "--download",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let tensorflow-datasets download when the data is not found locally",
    )
    g.add_argument(
        "--train-limit",
        type=_positive_int,
        default=None,
        help="use only the first N training images (quick checks)",
    )
    g.add_argument(
        "--test-limit",
        type=_positive_int,
        default=None,
        help="use only the first N test images (quick checks)",
    )

    g = p.add_argument_group("model and estimator")
    g.add_argument("--model", "-m", default=defaults["model"], choices=models, help="architecture")
    g.add_argument(
        "--quantizer",
        "--estimator",
        default=None,
        metavar="NAME",
        help=f"gradient estimator: {', '.join(estimators())}, or float (default: "
        "the model's own: reste for the ReSTE nets, bireal for Bi-Real Net, "
        "wrn_sign for WRN)",
    )
    g.add_argument("--a32", action="store_true", help="1W/32A: keep activations real")
    g.add_argument(
        "--block",
        choices=BLOCKS,
        default="reference",
        help="unit around each binary conv of the ResNet families: reference (ReSTE), "
        "prelu (BNN-tricks: BN, sign, bconv, + shortcut, PReLU), react (ReActNet's "
        "RSign and RPReLU)",
    )
    g.add_argument(
        "--downsample",
        choices=DOWNSAMPLES,
        default="reference",
        help="float shortcut downsample of the ResNet-18/34 nets: reference (strided 1x1 "
        "conv, BN) or BNN-tricks' v1 (1x1 conv, BN, avg-pool 2), v2 (avg-pool 2, 1x1 "
        "conv, BN), v3 (1x1 conv, BN, avg-pool 3 stride 2)",
    )
    g.add_argument(
        "--w32",
        action="store_true",
        help="32W/1A: keep weights real, activations binary (ReActNet's first step)",
    )
    g.add_argument(
        "--bn-momentum",
        type=float,
        default=0.9,
        help="BatchNorm momentum in Keras terms (0.9 = PyTorch's 0.1, the reference; "
        "BNN-tricks' PyTorch 0.2 is 0.8)",
    )
    g.add_argument(
        "--padding",
        choices=("one", "zero"),
        default="one",
        help="binary conv padding: one (LCE fast path) or zero (the reference)",
    )
    g.add_argument("--o-end", type=float, default=3.0, help="final o of ReSTE's schedule (from 1)")
    g.add_argument("--mu-start", type=_positive_float, default=20.0, help="BNN++ mu at epoch 0")
    g.add_argument(
        "--mu-end", type=_positive_float, default=200.0, help="BNN++ mu at the last epoch"
    )

    g = p.add_argument_group("optimization and schedules")
    g.add_argument(
        "--epochs", type=_positive_int, default=defaults["epochs"], help="training epochs"
    )
    g.add_argument(
        "-b",
        "--batch-size",
        type=_positive_int,
        default=defaults["batch_size"],
        help="global training batch size",
    )
    g.add_argument(
        "--batch-size-test",
        "-bt",
        type=_positive_int,
        default=defaults["batch_size_test"],
        help="evaluation batch size",
    )
    g.add_argument(
        "--optimizer",
        choices=training.OPTIMIZERS,
        default="sgd",
        help="sgd: PyTorch's SGD, cosine decay (ReSTE); adam: linear decay to 0 "
        "(Bi-Real/BNN-tricks)",
    )
    g.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help=f"base learning rate (default: {defaults['lr']} with sgd, {ADAM_LR} with adam)",
    )
    g.add_argument("--momentum", type=_non_negative_float, default=0.9, help="SGD momentum")
    g.add_argument(
        "--weight-decay",
        type=_non_negative_float,
        default=defaults["weight_decay"],
        help="L2 on every weight (BN included), added to the gradient before "
        "momentum as PyTorch's SGD does",
    )
    g.add_argument(
        "--warmup",
        nargs="?",
        type=int,
        const=5,
        default=0,
        metavar="EPOCHS",
        help="linear learning-rate warm-up; bare --warmup is the reference's 5 epochs",
    )
    g.add_argument(
        "--lr-schedule",
        choices=cb.DECAYS,
        default=None,
        help="after warm-up: cosine (ReSTE), linear to 0 (Bi-Real/BNN-tricks' Adam), step "
        "(--lr-steps, --lr-gamma) or sgdr (cosine with warm restarts; --sgdr-period, "
        "--sgdr-mult, --lr-min) (default: cosine with sgd, linear with adam)",
    )
    g.add_argument(
        "--lr-steps",
        type=_positive_int,
        nargs="+",
        default=None,
        metavar="EPOCH",
        help="step schedule: epochs at which lr is multiplied by --lr-gamma",
    )
    g.add_argument(
        "--lr-gamma",
        type=_positive_float,
        default=0.1,
        help="step schedule: the factor at each milestone",
    )
    g.add_argument(
        "--sgdr-period",
        type=_positive_int,
        default=2,
        help="sgdr: the first restart epoch after warm-up",
    )
    g.add_argument(
        "--sgdr-mult",
        type=float,
        default=2.0,
        help="sgdr: restarts at period * mult^k (mult 1: every period epochs)",
    )
    g.add_argument(
        "--lr-min",
        type=_non_negative_float,
        default=0.0,
        help="sgdr: the rate each cycle decays to",
    )
    g.add_argument(
        "--label-smoothing", type=_non_negative_float, default=0.0, help="label smoothing"
    )
    g.add_argument("--seed", type=int, default=1234, help="random seed")

    g = p.add_argument_group("distillation")
    g.add_argument(
        "--teacher",
        metavar="RUN_DIR",
        default=None,
        help="distill from a finished run of this project (its args.json and "
        "final.weights.h5), e.g. the float twin: --quantizer float",
    )
    g.add_argument(
        "--distill-weight",
        type=_non_negative_float,
        default=1.0,
        help="alpha: loss = (1 - alpha) CE + alpha T^2 KL(teacher || student); "
        "1 with T 1 is ReActNet's distribution loss",
    )
    g.add_argument(
        "--distill-temperature",
        type=_positive_float,
        default=1.0,
        help="T, the softmax temperature of the KL term",
    )

    g = p.add_argument_group("speed")
    g.add_argument(
        "--mixed-precision",
        choices=tuple(PRECISION_POLICIES),
        default="off",
        help="Keras mixed precision: compute in float16 (loss-scaled) or bfloat16, "
        "variables and logits float32; export converts a float32 twin",
    )
    g.add_argument(
        "--jit-compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="compile the training step with XLA (model.compile(jit_compile=True))",
    )

    g = p.add_argument_group("run state")
    g.add_argument("--results-dir", default="./results", help="where run folders are made")
    g.add_argument(
        "--name", default=None, help="run folder name (default: model_quantizer_dataset)"
    )
    g.add_argument("--resume", action="store_true", help="continue the run in --results-dir/--name")
    g.add_argument(
        "--auto-resume",
        action="store_true",
        help="continue the run if its folder holds a checkpoint, else start it: one "
        "command for a job that is restarted as it is (each worker of --strategy "
        "multi_worker)",
    )
    g.add_argument(
        "--evaluate",
        metavar="RUN_DIR",
        default=None,
        help="a run folder (or its checkpoint/) to evaluate without training",
    )
    g.add_argument(
        "--init-from",
        metavar="RUN_DIR",
        default=None,
        help="start from another run's last checkpoint (1W32A -> 1W1A two-stage recipe)",
    )
    g.add_argument(
        "--indicators",
        action="store_true",
        help="log ReSTE's estimating error and gradient stability per epoch",
    )
    g.add_argument(
        "--verbose", type=int, default=1, choices=(0, 1, 2), help="Keras progress output"
    )

    g = p.add_argument_group("export")
    g.add_argument(
        "--export-eval-limit",
        type=_positive_int,
        default=defaults.get("export_eval_limit"),
        metavar="N",
        help="evaluate the .tflite on the first N test images (LCE's x86 reference kernels "
        "are slow; Keras top-1 always uses the whole test set) (default: "
        + (str(defaults["export_eval_limit"]) if defaults.get("export_eval_limit") else "all")
        + ")",
    )
    g.add_argument(
        "--export",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="convert to model.tflite with LCE and evaluate it",
    )
    g.add_argument(
        "--export-packed",
        action="store_true",
        help="also write model.packed.npz: binary kernels as 1 bit per weight plus scales "
        "(the portable small checkpoint of 1W32A models); --evaluate accepts it",
    )

    g = p.add_argument_group("distribution")
    g.add_argument(
        "--strategy",
        choices=("default", "mirrored", "multi_worker"),
        default="default",
        help="tf.distribute strategy; mirrored/multi_worker use synchronized BatchNorm",
    )
    g.add_argument(
        "--logical-cpus",
        type=_positive_int,
        default=None,
        help="split the CPU into N logical devices (to exercise --strategy on one machine)",
    )
    p.set_defaults(sgd_lr=defaults["lr"])
    return p


# ---------------------------------------------------------------------- run state
def run_dir(args) -> str:
    name = args.name or f"{args.model}_{args.quantizer}_{args.dataset}" + (
        "_a32" if args.a32 else ""
    ) + ("_w32" if args.w32 else "")
    return os.path.join(args.results_dir, name)


def _json_args(args):
    return {k: v for k, v in sorted(vars(args).items())}


def _load_json(path):
    with open(path) as f:
        return json.load(f)


def _write_json(path, data):
    export.write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


# Flags that define a run: a resumed run must be given the same ones.
RUN_DEFINING_FLAGS = (
    "model",
    "quantizer",
    "dataset",
    "epochs",
    "lr",
    "batch_size",
    "optimizer",
    "momentum",
    "weight_decay",
    "warmup",
    "o_end",
    "mu_start",
    "mu_end",
    "a32",
    "w32",
    "block",
    "downsample",
    "padding",
    "mean_std",
    "crop_padding",
    "rotate",
    "mixup",
    "color_jitter",
    "lighting",
    "shuffle_buffer",
    "label_smoothing",
    "seed",
    "train_limit",
    "mixed_precision",
    "lr_schedule",
    "lr_steps",
    "lr_gamma",
    "sgdr_period",
    "sgdr_mult",
    "lr_min",
    "bn_momentum",
    "teacher",
    "distill_weight",
    "distill_temperature",
)


# Run-defining flags added later, with the value runs made before them had.
_FLAG_ADDED_LATER = {
    "mixed_precision": "off",
    "lr_steps": None,
    "lr_gamma": 0.1,
    "sgdr_period": 2,
    "sgdr_mult": 2.0,
    "lr_min": 0.0,
    "bn_momentum": 0.9,
    "teacher": None,
    "distill_weight": 1.0,
    "distill_temperature": 1.0,
    "w32": False,
    "block": "reference",
    "downsample": "reference",
    "mean_std": "dataset",
    "crop_padding": "zero",
    "rotate": 0.0,
    "mixup": 0.0,
    "color_jitter": False,
    "lighting": False,
    "shuffle_buffer": 10_000,
}


def _check_resume_args(args, saved):
    saved = {**_FLAG_ADDED_LATER, **saved}
    saved.setdefault("lr_schedule", "linear" if saved.get("optimizer") == "adam" else "cosine")
    changed = [
        f"--{k.replace('_', '-')} {getattr(args, k)} (run has {saved.get(k)})"
        for k in RUN_DEFINING_FLAGS
        if hasattr(args, k) and saved.get(k) != getattr(args, k)
    ]
    if changed:
        raise UsageError("--resume with different settings: " + ", ".join(changed))


# ------------------------------------------------------------------------- pieces
FINISHED = "finished"


def _check_run_folder(args, directory):
    """What the run folder and the flags ask for: True (resume from its checkpoint),
    False (start, or start again), or FINISHED (--auto-resume on a finished run: nothing
    to do); a UsageError when the folder does not allow what the flags ask. Writes
    nothing.

    A folder whose run was killed before its first checkpoint (args.json, no checkpoint,
    no metrics.json) is started again by the same command, with or without --resume."""
    ckpt_dir = os.path.join(directory, "checkpoint")
    has_checkpoint = os.path.isdir(ckpt_dir) and tf.train.latest_checkpoint(ckpt_dir) is not None
    args_path = os.path.join(directory, "args.json")
    if os.path.isfile(os.path.join(directory, "metrics.json")):
        if args.auto_resume:
            return FINISHED
        if args.resume:
            raise UsageError(
                f"{directory} holds a finished run (metrics.json); --evaluate it, or "
                "--name/--results-dir for a new one"
            )
    elif has_checkpoint and (args.resume or args.auto_resume):
        _check_resume_args(args, _load_json(args_path))
        return True
    elif os.path.isfile(args_path) and not has_checkpoint:
        # Killed before its first checkpoint: the same run starts again from epoch 1.
        _check_resume_args(args, _load_json(args_path))
        return False
    if args.resume:
        raise UsageError(f"--resume: no run in {directory}; start the run without --resume")
    if os.path.exists(directory) and os.listdir(directory):
        raise UsageError(
            f"{directory} already holds a run; pass --resume to continue it, or "
            "--name/--results-dir for a new one"
        )
    return False


def worker_task():
    """(is_chief, name) of this process from TF_CONFIG: the chief is the task of type
    "chief", else worker 0 (TensorFlow's convention); a single process is the chief."""
    try:
        config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    except json.JSONDecodeError as error:
        raise UsageError(f"TF_CONFIG is not JSON: {error}") from None
    task = config.get("task") or {}
    kind, index = task.get("type", "chief"), int(task.get("index", 0))
    chief = kind == "chief" or (
        kind == "worker" and index == 0 and "chief" not in config.get("cluster", {})
    )
    return chief, f"{kind}{index}"


def _workers_agree(strategy, error, resume):
    """A barrier before anything is written: every worker brings its verdict on the run
    folder (refuse, start, resume) and all go on only if all verdicts are the same."""
    verdict = 0 if error else 1 + int(resume)  # refuse, start, resume
    counts = _sum_over_workers(strategy, tf.one_hot(verdict, 3))
    if error:
        raise error
    if counts[verdict] != counts.sum():
        raise UsageError(
            "the workers disagree on the run folder (another worker refused it, or they "
            "see different files); every worker must see the same --results-dir on a "
            "shared file system"
        )


def _sum_over_workers(strategy, value):
    """All-reduce (sum) a small tensor over every replica: a barrier that carries data."""

    @tf.function
    def reduce():
        def replica_fn():
            context = tf.distribute.get_replica_context()
            return context.all_reduce(tf.distribute.ReduceOp.SUM, tf.identity(value))

        return strategy.run(replica_fn)

    return strategy.experimental_local_results(reduce())[0].numpy()


def weights_digest(model) -> str:
    """sha256 of every weight's bytes: equal digests, bit-identical models."""
    digest = hashlib.sha256()
    for w in model.get_weights():
        digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()


def make_strategy(args):
    if args.logical_cpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * args.logical_cpus
        )
    if args.strategy == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or [
            d.name for d in tf.config.list_logical_devices("CPU")
        ]
        return tf.distribute.MirroredStrategy(devices)
    if args.strategy == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def build_model(args, num_classes, input_shape):
    return models.build(
        args.model,
        quantizer=args.quantizer,
        input_shape=input_shape,
        num_classes=num_classes,
        a32=True if args.a32 else None,
        w32=getattr(args, "w32", False),
        padding=args.padding,
        sync_bn=args.strategy != "default",
        bn_momentum=args.bn_momentum,
        block=getattr(args, "block", "reference"),
        downsample=getattr(args, "downsample", "reference"),
    )


def init_weights(model, twin, checkpoint_path, distilled=False):
    """Load another run's weights into `model`, and nothing of its optimizer.

    Restored by object graph into `twin` (an uncompiled model of model's architecture),
    not by weight list: a 1W32A run has no activation quantizers, so its list differs.
    Not into `model` itself: a compiled Keras model tracks its optimizer, and restoring
    it would also restore the other run's SGD velocity (which carries its lr).
    distilled: the other run checkpointed a Distiller (its student under model/student)."""
    saved_model = tf.train.Checkpoint(student=twin) if distilled else twin
    tf.train.Checkpoint(model=saved_model).restore(
        checkpoint_path
    ).expect_partial().assert_nontrivial_match()
    model.set_weights(twin.get_weights())


def learning_rate_schedule(args) -> cb.LearningRateSchedule:
    """--lr-schedule and its options (defaults set by resolve_args)."""
    try:
        return cb.LearningRateSchedule(
            args.lr,
            args.epochs,
            args.warmup,
            args.lr_schedule,
            steps=args.lr_steps or (),
            gamma=args.lr_gamma,
            restart_period=args.sgdr_period,
            restart_mult=args.sgdr_mult,
            min_lr=args.lr_min,
        )
    except ConfigError as error:
        raise UsageError(f"--lr-schedule {args.lr_schedule}: {error}") from None


def teacher_run(args):
    """--teacher RUN_DIR, checked before anything is written: the teacher's args (a
    Namespace to build its model with), or None without --teacher."""
    if not args.teacher:
        return None
    args_path = os.path.join(args.teacher, "args.json")
    weights = os.path.join(args.teacher, "final.weights.h5")
    if not os.path.isfile(args_path):
        raise UsageError(
            f"--teacher: {args.teacher} is not a run folder of this project (no args.json)"
        )
    if not os.path.isfile(weights):
        raise UsageError(f"--teacher: {args.teacher} has no final.weights.h5 (not finished?)")
    saved = _load_json(args_path)
    ours, theirs = DATASETS[args.dataset], DATASETS.get(saved.get("dataset"))
    if theirs is None or (theirs.num_classes, theirs.image_shape) != (
        ours.num_classes,
        ours.image_shape,
    ):
        found = f"{theirs.num_classes} classes of {theirs.image_shape}" if theirs else "?"
        raise UsageError(
            f"--teacher: {args.teacher} was trained on {saved.get('dataset')} ({found}); "
            f"this run needs {ours.num_classes} classes of {ours.image_shape}"
        )
    teacher = argparse.Namespace(**{**vars(args), **_FLAG_ADDED_LATER, **saved})
    teacher.strategy = args.strategy  # BN synchronization as the student's
    return teacher


def estimator_schedule(args) -> cb.EstimatorSchedule:
    """The run's o / mu schedule: training, --resume and --evaluate all use this one."""
    return cb.EstimatorSchedule(
        args.epochs, o_end=args.o_end, mu_start=args.mu_start, mu_end=args.mu_end
    )


def compile_model(model, args):
    """PyTorch's SGD (or Adam) with the reference's coupled weight decay on every
    weight, cross-entropy with optional label smoothing (`reste_larq.training`)."""
    model.compile(
        optimizer=training.make_optimizer(
            args.optimizer, args.lr, momentum=args.momentum, coupled_weight_decay=args.weight_decay
        ),
        loss=training.sparse_cross_entropy(
            getattr(model, "student", model).output_shape[-1], args.label_smoothing
        ),
        metrics=_metrics(getattr(model, "student", model).output_shape[-1], args),
        jit_compile=args.jit_compile,
    )


def _metrics(num_classes, args):
    if getattr(args, "mixup", 0.0):  # soft training labels
        return [
            training.top_k_accuracy(num_classes, 1, "accuracy"),
            training.top_k_accuracy(num_classes, 5, "top5"),
        ]
    return ["accuracy", tf.keras.metrics.SparseTopKCategoricalAccuracy(5, name="top5")]


def evaluate_keras(model, eval_ds):
    """(top1, top5) in percent with the Keras model in inference mode."""
    logits, labels = [], []
    for x, y in eval_ds:
        logits.append(model(x, training=False).numpy())
        labels.append(y.numpy())
    logits, labels = np.concatenate(logits), np.concatenate(labels)
    return export.topk_accuracy(logits, labels, 1), export.topk_accuracy(logits, labels, 5)


class EpochState(tf.keras.callbacks.Callback):
    """After each epoch: save model + optimizer + epoch (for --resume) and the best
    test top-1 so far (state.json)."""

    def __init__(self, directory, checkpoint, epoch_var, best):
        super().__init__()
        self.manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=1)
        self.epoch_var = epoch_var
        self.best = best
        self.state_path = os.path.join(os.path.dirname(directory), "state.json")

    diverged_epoch = None  # 1-based: the epoch whose loss was not finite

    def on_epoch_end(self, epoch, logs=None):
        # TerminateOnNaN stops the batch loop, yet Keras still ends the epoch: its NaN
        # weights must not replace the last finite checkpoint (max_to_keep=1).
        loss = (logs or {}).get("loss")
        if self.model.stop_training or (loss is not None and not np.isfinite(loss)):
            self.diverged_epoch = epoch + 1
            return
        top1 = 100.0 * float((logs or {}).get("val_accuracy", 0.0))
        if top1 > self.best["best_test_top1"]:
            self.best.update(best_test_top1=round(top1, 4), best_epoch=epoch + 1)
        self.epoch_var.assign(epoch + 1)
        self.manager.save(checkpoint_number=epoch + 1)
        _write_json(self.state_path, {"epoch": epoch + 1, **self.best})


def _diverged_message(directory, epoch, lr):
    """One line: where training diverged, the last finite checkpoint, and the command
    that continues from it with a lower learning rate."""
    last = tf.train.latest_checkpoint(os.path.join(directory, "checkpoint"))
    where = f"training diverged (NaN loss) in epoch {epoch}; see {directory}/history.csv"
    if last is None:
        return f"{where}; no epoch finished with finite weights: start again with a lower --lr"
    return (
        f"{where}; the last finite checkpoint is {last} (epoch {last.rsplit('-', 1)[-1]}): "
        f"continue from it in a new run with a lower rate, e.g. --init-from {directory} "
        f"--lr {lr / 10:g} --name NEW_NAME"
    )


# --------------------------------------------------------------------------- main
def resolve_args(args):
    """Fill the defaults that depend on other flags: --lr on the optimizer, --quantizer
    on the model (its own estimator); canonicalize the estimator name."""
    if args.lr is None:
        args.lr = ADAM_LR if args.optimizer == "adam" else args.sgd_lr
    if args.lr_schedule is None:
        args.lr_schedule = "linear" if args.optimizer == "adam" else "cosine"
    if args.quantizer is None:
        args.quantizer = models.info(args.model).quantizer
    if args.quantizer != "float":
        args.quantizer = canonical_estimator(args.quantizer)
    return args


def run(args, load_data) -> dict:
    """Train (or evaluate) as `args` says; returns the metrics written to metrics.json.

    load_data(args, train=True) -> Data (see `Data`).
    """
    resolve_args(args)
    if args.o_end < 1:
        raise UsageError(f"--o-end must be >= 1 (got {args.o_end})")
    if args.warmup < 0 or (args.warmup and args.warmup >= args.epochs):
        raise UsageError(f"--warmup must be in [0, epochs) (got {args.warmup})")
    if args.label_smoothing >= 1:
        raise UsageError(f"--label-smoothing must be < 1 (got {args.label_smoothing})")

    if args.w32 and (args.a32 or models.info(args.model).a32):
        raise UsageError(
            f"--w32 keeps weights real, and {args.model} with --a32 or by default keeps "
            "activations real: nothing would be binary (use --quantizer float)"
        )
    if getattr(args, "block", "reference") != "reference" and not models.info(args.model).blocks:
        raise UsageError(
            f"--block {args.block}: {args.model} has its own block; --block is for "
            + ", ".join(n for n in models.available() if models.info(n).blocks)
        )
    if getattr(args, "downsample", "reference") != "reference" and not (
        models.info(args.model).downsamples
    ):
        raise UsageError(
            f"--downsample {args.downsample}: {args.model} has no 1x1 conv downsample; "
            "--downsample is for "
            + ", ".join(n for n in models.available() if models.info(n).downsamples)
        )
    if hasattr(args, "mean_std"):  # a grayscale dataset with RGB statistics fails here
        with_mean_std(DATASETS[args.dataset], args.mean_std)
    if not 0.0 <= args.distill_weight <= 1.0:
        raise UsageError(f"--distill-weight must be in [0, 1] (got {args.distill_weight})")
    if not 0.0 <= args.bn_momentum < 1.0:
        raise UsageError(f"--bn-momentum must be in [0, 1) (got {args.bn_momentum})")
    learning_rate_schedule(args)  # bad schedule flags fail here, before anything is written
    if args.evaluate:
        return evaluate_run(args, load_data)

    directory = run_dir(args)
    # The run folder's checks write nothing: with several workers they must all decide
    # the same (start, resume, or refuse) before the chief writes anything.
    folder_error = None
    try:
        state = _check_run_folder(args, directory)
    except UsageError as error:
        folder_error, state = error, False
    if args.strategy != "multi_worker" and folder_error:
        raise folder_error
    if state == FINISHED:  # --auto-resume of a finished run: report it, write nothing
        print(f"{directory} holds a finished run: nothing to do", file=sys.stderr)
        return _load_json(os.path.join(directory, "metrics.json"))
    args.resume = state
    teacher_args = teacher_run(args)
    init_checkpoint = None
    if args.init_from:
        init_checkpoint = tf.train.latest_checkpoint(os.path.join(args.init_from, "checkpoint"))
        if init_checkpoint is None or not os.path.isfile(os.path.join(args.init_from, "args.json")):
            raise UsageError(
                f"--init-from: {args.init_from} is not a run folder with args.json and "
                "a checkpoint/"
            )

    tf.keras.utils.set_random_seed(args.seed)
    # Before any model is built: Keras layers take the global policy when made (float16
    # compiles with dynamic loss scaling: Keras wraps the optimizer).
    tf.keras.mixed_precision.set_global_policy(PRECISION_POLICIES[args.mixed_precision])
    strategy = make_strategy(args)
    if args.strategy == "multi_worker":
        _workers_agree(strategy, folder_error, args.resume)
    chief, task = worker_task() if args.strategy == "multi_worker" else (True, "chief0")
    # Only the chief writes the run folder; other workers write to a temporary folder
    # of their own and delete it at the end (Keras' multi-worker guide).
    out = directory if chief else tempfile.mkdtemp(prefix=f"reste_larq_{task}_")
    try:
        return _train(args, load_data, strategy, directory, out, teacher_args, init_checkpoint)
    finally:
        if not chief:
            shutil.rmtree(out, ignore_errors=True)


def _train(args, load_data, strategy, directory, out, teacher_args, init_checkpoint):
    """Train as `run` prepared: read the run's state from `directory` (the chief's run
    folder), write this worker's files to `out`."""
    chief = out == directory
    ckpt_dir = os.path.join(directory, "checkpoint")
    data = load_data(args)
    os.makedirs(out, exist_ok=True)
    with strategy.scope():
        model = build_model(args, data.num_classes, data.input_shape)
        student = model
        if teacher_args is not None:
            teacher = build_model(teacher_args, data.num_classes, data.input_shape)
            teacher.load_weights(os.path.join(args.teacher, "final.weights.h5"))
            model = Distiller(student, teacher, args.distill_weight, args.distill_temperature)
        compile_model(model, args)
        epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
        checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, epoch=epoch_var)

    best = {"best_test_top1": 0.0, "best_epoch": 0}
    first_epoch = 0
    if args.resume:
        checkpoint.restore(tf.train.latest_checkpoint(ckpt_dir)).expect_partial()
        first_epoch = int(epoch_var.numpy())
        state_path = os.path.join(directory, "state.json")
        if os.path.exists(state_path):
            state = _load_json(state_path)
            best = {k: state[k] for k in best}
        print(f"resuming {directory} at epoch {first_epoch + 1}/{args.epochs}", flush=True)
    else:
        if init_checkpoint:
            init_weights(
                student,
                build_model(args, data.num_classes, data.input_shape),
                init_checkpoint,
                distilled=bool(
                    _load_json(os.path.join(args.init_from, "args.json")).get("teacher")
                ),
            )
            print(f"initialized from {init_checkpoint}", flush=True)
        _write_json(os.path.join(out, "args.json"), _json_args(args))

    schedule = estimator_schedule(args)
    epoch_state = EpochState(os.path.join(out, "checkpoint"), checkpoint, epoch_var, best)
    callbacks = [
        schedule,
        learning_rate_schedule(args),
    ]
    if args.indicators:
        callbacks.append(cb.Indicators(data.indicator_batch(), o=args.o_end))
    if export.count_binary_kernels(student):
        callbacks.append(cb.FrozenFraction())
    callbacks += [
        epoch_state,
        tf.keras.callbacks.CSVLogger(os.path.join(out, "history.csv"), append=args.resume),
        tf.keras.callbacks.TensorBoard(
            os.path.join(out, "logs"), write_graph=False, profile_batch=0
        ),
        tf.keras.callbacks.ModelCheckpoint(
            os.path.join(out, "best.weights.h5"),
            monitor="val_accuracy",
            mode="max",
            save_best_only=True,
            save_weights_only=True,
            initial_value_threshold=best["best_test_top1"] / 100.0 if args.resume else None,
        ),
        tf.keras.callbacks.TerminateOnNaN(),
    ]

    started = time.time()
    if first_epoch < args.epochs:
        train_ds, steps = data.make_train(first_epoch)
        if chief:
            print(
                f"training {args.model} ({args.quantizer}) on {args.dataset}: "
                f"{args.epochs - first_epoch} epochs of {steps} steps, batch {args.batch_size}; "
                f"run folder {directory}",
                flush=True,
            )
        model.fit(
            train_ds,
            epochs=args.epochs,
            initial_epoch=first_epoch,
            steps_per_epoch=steps,
            validation_data=data.eval_ds,
            callbacks=callbacks,
            verbose=args.verbose,
        )
    if model.stop_training:  # only TerminateOnNaN stops a run early
        raise UsageError(_diverged_message(directory, epoch_state.diverged_epoch, args.lr))
    if args.strategy != "default":
        # Evaluate and export a one-device twin: synchronized BatchNorm would run
        # collectives (every worker) even in inference.
        twin = build_model(
            argparse.Namespace(**{**vars(args), "strategy": "default"}),
            data.num_classes,
            data.input_shape,
        )
        twin.set_weights(student.get_weights())
        student = twin
    student.save_weights(os.path.join(out, "final.weights.h5"))
    digest = weights_digest(student)
    if args.strategy == "multi_worker":  # every worker prints it: equal means in step
        print(f"final weights sha256: {digest}", flush=True)
    if not chief:
        # The chief evaluates, exports and writes metrics.json. Wait for it: a worker
        # that exits first fails the chief's coordination service (heartbeat timeout).
        if args.strategy == "multi_worker":
            _sum_over_workers(strategy, tf.ones([1]))
        return {}
    metrics = _final_metrics(args, student, data, schedule)
    metrics.update(best)
    metrics["per_epoch"] = _per_epoch(os.path.join(out, "history.csv"))
    metrics["train_seconds"] = round(time.time() - started, 1)
    metrics["weights_sha256"] = digest
    if teacher_args is not None:
        teacher_metrics = os.path.join(args.teacher, "metrics.json")
        metrics["teacher"] = args.teacher
        if os.path.isfile(teacher_metrics):
            metrics["teacher_test_top1"] = _load_json(teacher_metrics).get("test_top1")
    if args.export:  # the student alone
        metrics.update(_export(student, data, directory, args.export_eval_limit))
    if args.export_packed:
        metrics.update(_export_packed(student, directory))
    _write_json(os.path.join(directory, "metrics.json"), metrics)
    print(json.dumps({k: metrics[k] for k in metrics if k != "args"}, indent=1), flush=True)
    if args.strategy == "multi_worker":
        _sum_over_workers(strategy, tf.ones([1]))  # release the other workers
    return metrics


PER_EPOCH_COLUMNS = ("epoch", "lr", "o", "mu", "frozen_fraction", "loss", "val_accuracy")


def _per_epoch(history_csv):
    """history.csv's schedule values and frozen fraction, one dict per epoch."""
    if not os.path.isfile(history_csv):
        return []
    with open(history_csv) as f:
        rows = list(csv.DictReader(f))
    return [
        {
            k: (int(row[k]) if k == "epoch" else float(row[k]))
            for k in PER_EPOCH_COLUMNS
            if row.get(k)
        }
        for row in rows
    ]


def _final_metrics(args, model, data, schedule):
    top1, top5 = evaluate_keras(model, data.eval_ds)
    return {
        "test_top1": round(top1, 4),
        "test_top5": round(top5, 4),
        "epochs": args.epochs,
        "quantizer": args.quantizer,
        "model": args.model,
        "dataset": args.dataset,
        **({"o_final": schedule.o_at(args.epochs - 1)} if args.quantizer == "reste" else {}),
        **({"mu_final": schedule.mu_at(args.epochs - 1)} if args.quantizer == "bnnpp" else {}),
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "args": _json_args(args),
    }


def _export(model, data, directory=None, eval_limit=None):
    """Convert with LCE, evaluate the flatbuffer with LCE's interpreter, and (with a
    run directory) write model.tflite."""
    # Status lines go to stderr: stdout carries the metrics JSON (--evaluate > m.json).
    print("converting to a TFLite flatbuffer with Larq Compute Engine ...", file=sys.stderr)
    flatbuffer = export.convert(model)
    if directory:
        export.write_atomic(os.path.join(directory, "model.tflite"), flatbuffer)
    ops = export.op_counts(flatbuffer)
    print(
        f"evaluating the .tflite with LCE's interpreter ({ops.get('LceBconv2d', 0)} "
        "LceBconv2d; x86 runs LCE's reference kernels, ARM its fast ones)",
        file=sys.stderr,
    )
    logits, labels = export.tflite_predictions(
        flatbuffer, data.eval_ds, limit=eval_limit, progress=True
    )
    return {
        "tflite_eval_images": len(labels),
        "tflite_test_top1": round(export.topk_accuracy(logits, labels, 1), 4),
        "tflite_test_top5": round(export.topk_accuracy(logits, labels, 5), 4),
        "tflite_bytes": len(flatbuffer),
        "tflite_lce_bconv2d": ops.get("LceBconv2d", 0),
        "binary_convs": export.count_binary_convs(model),
    }


def _export_packed(model, directory):
    """model.packed.npz (export.save_packed), written atomically."""
    path = os.path.join(directory, PACKED_FILE)
    stats = export.save_packed(model, path + ".tmp")
    os.replace(path + ".tmp", path)
    return {"packed_bytes": os.path.getsize(path), "packed_binary_kernels": stats["binary_kernels"]}


PACKED_FILE = "model.packed.npz"


def evaluate_run(args, load_data) -> dict:
    """--evaluate RUN_DIR (or RUN_DIR/checkpoint, or RUN_DIR/model.packed.npz): rebuild
    the run's model from its args.json, load its latest checkpoint (or the packed
    file), and report the same metrics."""
    path = args.evaluate.rstrip("/")
    packed = path.endswith(".npz")
    directory = os.path.dirname(path) if packed or os.path.basename(path) == "checkpoint" else path
    ckpt_dir = os.path.join(directory, "checkpoint")
    args_path = os.path.join(directory, "args.json")
    if packed and not (os.path.isfile(path) and os.path.isfile(args_path)):
        raise UsageError(f"--evaluate: {path} is not a packed file in a run folder with args.json")
    if not packed and (
        not os.path.isfile(args_path) or tf.train.latest_checkpoint(ckpt_dir) is None
    ):
        raise UsageError(
            f"--evaluate: {args.evaluate} is not a run folder with args.json and checkpoint/"
        )
    saved = argparse.Namespace(**{**vars(args), **_FLAG_ADDED_LATER, **_load_json(args_path)})
    saved.evaluate, saved.strategy, saved.logical_cpus = args.evaluate, "default", None
    for override in (
        "data_dir",
        "download",
        "test_limit",
        "batch_size_test",
        "export",
        "export_eval_limit",
    ):
        setattr(saved, override, getattr(args, override))
    data = load_data(saved, train=False)
    model = build_model(saved, data.num_classes, data.input_shape)
    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
    if packed:
        export.load_packed(path, model)
    else:
        # A distilled run checkpoints the Distiller: the student sits under model/student.
        saved_model = tf.train.Checkpoint(student=model) if saved.teacher else model
        tf.train.Checkpoint(model=saved_model, epoch=epoch_var).restore(
            tf.train.latest_checkpoint(ckpt_dir)
        ).expect_partial().assert_existing_objects_matched()
    metrics = _final_metrics(saved, model, data, estimator_schedule(saved))
    if packed:
        metrics["evaluated_file"] = path
    else:
        metrics["evaluated_epoch"] = int(epoch_var.numpy())
    if args.export:
        metrics.update(_export(model, data, eval_limit=args.export_eval_limit))
    print(json.dumps({k: metrics[k] for k in metrics if k != "args"}, indent=1), flush=True)
    return metrics


def parse(arg_parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """parse_args, then the chosen model's own recipe for every flag not given."""
    args = arg_parser.parse_args(argv)
    recipe = getattr(arg_parser, "model_defaults", {}).get(args.model)
    if recipe:
        probe = copy.deepcopy(arg_parser)
        for action in probe._actions:
            action.default = argparse.SUPPRESS
        given = set(vars(probe.parse_args(argv)))
        for key, value in recipe.items():
            if key not in given:
                setattr(args, key, value)
    return args


def main(arg_parser: argparse.ArgumentParser, load_data, argv=None) -> int:
    """Parse, run, and turn expected failures into one-line errors (exit 2)."""
    args = parse(arg_parser, argv)
    try:
        run(args, load_data)
    # Only the project's own errors become one line; anything else (TensorFlow's
    # ValueErrors included) is a bug to report and keeps its traceback.
    except (UsageError, ConfigError, DataNotFoundError, DataFormatError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


class Data:
    """What a training run needs from its data source."""

    def __init__(self, num_classes, input_shape, eval_ds, make_train=None, indicator_batch=None):
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self.eval_ds = eval_ds
        self.make_train = make_train  # first_epoch -> (dataset, steps_per_epoch)
        self.indicator_batch = indicator_batch  # () -> (images, labels), called if needed
