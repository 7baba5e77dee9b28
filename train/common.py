"""The training CLIs' flags: argparse -> `reste_larq.config.RunConfig`, and one-line
errors. The run itself (run folder, resume, teacher, fit, evaluation, export) is the
library's `reste_larq.experiment.Experiment`; `train/` only wires flags to it.
"""

from __future__ import annotations

import argparse
import copy
import sys

import numpy as np

from reste_larq import callbacks as cb
from reste_larq import training
from reste_larq._tensorflow import filter_cpp_logs  # noqa: F401  (for the CLI modules)
from reste_larq.config import ADAM_LR, PRECISION_CHOICES, RunConfig
from reste_larq.errors import ConfigError, DataFormatError, DataNotFoundError, RunError
from reste_larq.experiment import Experiment
from reste_larq.models.blocks import BLOCKS, DOWNSAMPLES
from reste_larq.quantizers import estimators

# The CLIs' one-line errors: a run folder or configuration that does not allow what
# the flags ask (the library's RunError), besides bad values and missing data.
UsageError = RunError
ONE_LINE_ERRORS = (RunError, ConfigError, DataNotFoundError, DataFormatError)


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
        choices=PRECISION_CHOICES,
        default="auto",
        help="Keras mixed precision: compute in float16 (loss-scaled) or bfloat16, "
        "variables and logits float32; export converts a float32 twin. auto: bfloat16 "
        "on CPUs with AVX-512 BF16 (Linux, no GPU), else off (float32); args.json "
        "keeps what it chose",
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
        "--deterministic",
        action="store_true",
        help="the same weights from the same command, bit for bit: op determinism (GPU "
        "kernels) and one inter-op thread (CPU: concurrent ops can leave a float conv's "
        "gradient an ulp apart); slower on GPUs",
    )
    g.add_argument(
        "--barrier-timeout",
        type=_positive_float,
        default=7200.0,
        help="multi_worker: seconds a worker waits for the others at the start-of-run and "
        "end-of-run barriers (the chief's final evaluation and export must fit) before it "
        "stops naming the worker that did not arrive",
    )
    g.add_argument(
        "--logical-cpus",
        type=_positive_int,
        default=None,
        help="split the CPU into N logical devices (to exercise --strategy on one machine)",
    )
    p.set_defaults(sgd_lr=defaults["lr"])
    return p


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


def config(args: argparse.Namespace) -> RunConfig:
    """The run configuration the flags describe, its flag-dependent defaults filled."""
    return RunConfig.from_namespace(args).resolved()


def run(args: argparse.Namespace, load_data=None) -> dict:
    """Train (or evaluate) as the flags say; returns the metrics written to metrics.json."""
    return Experiment(config(args), load_data).run()


def main(arg_parser: argparse.ArgumentParser, load_data, argv=None) -> int:
    """Parse, run, and turn expected failures into one-line errors (exit 2)."""
    args = parse(arg_parser, argv)
    try:
        run(args, load_data)
    # Only the project's own errors become one line; anything else (TensorFlow's
    # ValueErrors included) is a bug to report and keeps its traceback.
    except ONE_LINE_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
