"""Train a binary network on ImageNet (TFDS `imagenet2012`, prepared in --data-dir).

    python -m train.imagenet --model resnet18_1w1a_imagenet --quantizer reste

Defaults are the ReSTE reference's ImageNet recipe: SGD lr 0.1 momentum 0.9, weight
decay 1e-4, batch 750 (test 256), cosine decay over 250 epochs, o: 1 -> 3. The batch
size is global: with --strategy it is split across replicas; scale --lr linearly if
you change it (lr = 0.1 * batch / 750).
"""

from __future__ import annotations

import sys

from reste_larq import data, experiment, models
from train import common

DEFAULTS = {
    "model": "resnet18_1w1a_imagenet",
    "dataset": "imagenet2012",
    "epochs": 250,
    "lr": 0.1,
    "batch_size": 750,
    "batch_size_test": 256,
    "weight_decay": 1e-4,
    # LCE's x86 reference kernels take ~90 ms an image for Bi-Real-18 on one core:
    # the whole validation set would take over an hour after training.
    "export_eval_limit": 3000,
}


# data -> Data: TFDS's prepared imagenet2012 in --data-dir
load_data = experiment.imagenet_data


def build_parser():
    p = common.parser(
        "Train a binary network on ImageNet (ReSTE ImageNet recipe).",
        prog="python -m train.imagenet",
        models=models.available("imagenet"),
        datasets=["imagenet2012"],
        defaults=DEFAULTS,
    )
    g = p.add_argument_group("ImageNet augmentation")
    g.add_argument(
        "--shuffle-buffer",
        type=common._positive_int,
        default=data.IMAGENET_SHUFFLE_BUFFER,
        help="examples in the shuffle buffer (encoded JPEGs, ~110 KB each)",
    )
    g.add_argument(
        "--color-jitter",
        action="store_true",
        help="BNN-tricks' colour jitter: brightness, contrast, saturation 0.4, hue 0.1 "
        "(the two-stage recipe uses it in stage 1 only)",
    )
    g.add_argument(
        "--lighting",
        action="store_true",
        help="AlexNet's PCA lighting noise, alphastd 0.1 (BNN-tricks' Lighting)",
    )
    return p


def main(argv=None) -> int:
    return common.main(build_parser(), load_data, argv)


if __name__ == "__main__":
    common.filter_cpp_logs()  # XLA's and the runtime's C++ log lines (TF_CPP_MIN_LOG_LEVEL)
    sys.exit(main())
