"""Train a binary network on a small-image dataset (CIFAR-10/100, (Fashion-)MNIST).

    python -m train.cifar --quantizer reste                  # the ReSTE CIFAR-10 recipe
    python -m train.cifar --dataset fashion_mnist --epochs 3 # a short offline run

Defaults are the ReSTE reference's CIFAR recipe: resnet20_1w1a, SGD lr 0.1 momentum 0.9,
weight decay 1e-4 on every weight, batch 256 (test 128), cosine decay, o: 1 -> 3,
1000 epochs (add --warmup for its 5-epoch linear warm-up).
"""

from __future__ import annotations

import sys

from reste_larq import data, experiment, models
from train import common

DEFAULTS = {
    "model": "resnet20_1w1a",
    "dataset": "cifar10",
    "epochs": 1000,
    "lr": 0.1,
    "batch_size": 256,
    "batch_size_test": 128,
    "weight_decay": 1e-4,
}


# A model's own recipe, taken for every flag the command line does not set.
MODEL_DEFAULTS = {
    # McDonnell's 1-bit WRN as szagoruyko/binary-wide-resnet trains it (main.py):
    # CIFAR-100 (the paper's 80.0 %), SGD 0.1 momentum 0.9, weight decay 5e-4, batch
    # 128, 256 epochs, cosine with warm restarts at 2, 4, ..., 128 down to 1e-4, its
    # mean/std, reflect-padded crops.
    "wrn20_10_1bit": {
        "dataset": "cifar100",
        "epochs": 256,
        "batch_size": 128,
        "weight_decay": 5e-4,
        "lr_schedule": "sgdr",
        "sgdr_period": 2,
        "sgdr_mult": 2.0,
        "lr_min": 1e-4,
        "mean_std": "wrn",
        "crop_padding": "reflect",
    },
}


# data -> Data: the official offline files or TFDS, the ReSTE reference's augmentation
load_data = experiment.small_image_data


def build_parser():
    p = common.parser(
        "Train a binary network on a small-image dataset (ReSTE CIFAR recipe).",
        prog="python -m train.cifar",
        models=models.available("cifar"),
        datasets=list(data.SMALL_IMAGE_DATASETS),
        defaults=DEFAULTS,
        model_defaults=MODEL_DEFAULTS,
    )
    g = p.add_argument_group("small-image augmentation and normalization")
    g.add_argument(
        "--crop-padding",
        choices=data.PAD_MODES,
        default="zero",
        help="padding of the 4-pixel random crop: zero (ReSTE) or reflect (1-bit WRN)",
    )
    g.add_argument(
        "--rotate",
        type=common._non_negative_float,
        default=0.0,
        metavar="DEGREES",
        help="random rotation in [-DEGREES, DEGREES] (BNN-tricks: 15), nearest, zero fill",
    )
    g.add_argument(
        "--mixup",
        type=common._non_negative_float,
        default=0.0,
        metavar="ALPHA",
        help="mixup of each training batch with lambda ~ Beta(ALPHA, ALPHA) (0: off)",
    )
    g.add_argument(
        "--mean-std",
        choices=data.MEAN_STD,
        default="dataset",
        help="normalization: the dataset's (the ReSTE reference's ImageNet statistics "
        "for CIFAR) or the 1-bit WRN code's CIFAR-10 RGB statistics",
    )
    return p


def main(argv=None) -> int:
    return common.main(build_parser(), load_data, argv)


if __name__ == "__main__":
    common.filter_cpp_logs()  # XLA's and the runtime's C++ log lines (TF_CPP_MIN_LOG_LEVEL)
    sys.exit(main())
