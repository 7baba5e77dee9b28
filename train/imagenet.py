"""Train a binary network on ImageNet (TFDS `imagenet2012`, prepared in --data-dir).

    python -m train.imagenet --model resnet18_1w1a_imagenet --quantizer reste

Defaults are the ReSTE reference's ImageNet recipe: SGD lr 0.1 momentum 0.9, weight
decay 1e-4, batch 750 (test 256), cosine decay over 250 epochs, o: 1 -> 3. The batch
size is global: with --strategy it is split across replicas; scale --lr linearly if
you change it (lr = 0.1 * batch / 750).
"""

from __future__ import annotations

import sys

from reste_larq import data, models
from train import common

DEFAULTS = {
    "model": "resnet18_1w1a_imagenet",
    "dataset": "imagenet2012",
    "epochs": 250,
    "lr": 0.1,
    "batch_size": 750,
    "batch_size_test": 256,
    "weight_decay": 1e-4,
}


def load_data(args, train: bool = True) -> common.Data:
    info = data.info(args.dataset)
    eval_ds = data.imagenet_dataset(
        "validation", args.data_dir, args.batch_size_test, training=False, download=args.download
    )
    if args.test_limit:
        eval_ds = eval_ds.unbatch().take(args.test_limit).batch(args.batch_size_test)
    if not train:
        return common.Data(info.num_classes, info.image_shape, eval_ds)
    train_ds = data.imagenet_dataset(
        "train",
        args.data_dir,
        args.batch_size,
        training=True,
        seed=args.seed,
        download=args.download,
    )
    if args.train_limit:
        train_ds = train_ds.unbatch().take(args.train_limit).batch(args.batch_size)
    indicator_batch = next(iter(train_ds))
    return common.Data(
        info.num_classes,
        info.image_shape,
        eval_ds,
        lambda first_epoch: (train_ds, None),
        indicator_batch,
    )


def build_parser():
    return common.parser(
        "Train a binary network on ImageNet (ReSTE ImageNet recipe).",
        prog="python -m train.imagenet",
        models=models.available("imagenet"),
        datasets=["imagenet2012"],
        defaults=DEFAULTS,
    )


def main(argv=None) -> int:
    return common.main(build_parser(), load_data, argv)


if __name__ == "__main__":
    sys.exit(main())
