"""Data: tensorflow-datasets first, the official offline formats where there is no
network, and `tf.data` pipelines with the reference's augmentation.

Offline formats read from `data_dir` (checked before TFDS):
- CIFAR-10/100: `cifar-10-python.tar.gz` / `cifar-100-python.tar.gz`, or the extracted
  `cifar-10-batches-py/` / `cifar-100-python/` folder (the official python pickles).
- MNIST / Fashion-MNIST: the original idx files `train-images-idx3-ubyte.gz`,
  `train-labels-idx1-ubyte.gz`, `t10k-images-idx3-ubyte.gz`, `t10k-labels-idx1-ubyte.gz`
  (Debian's `dataset-fashion-mnist` installs them in /usr/share/datasets/fashion-mnist/,
  which is also searched for fashion_mnist).

Small-image datasets are held in memory as uint8 and shuffled/augmented with stateless
random ops seeded by (seed, epoch), so epoch e sees the same batches whether the run
was resumed or not.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import tarfile

import numpy as np
import tensorflow as tf


class DataNotFoundError(FileNotFoundError):
    """No dataset in `data_dir` and TFDS could not provide it; says what to put where."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    image_shape: tuple
    mean: tuple
    std: tuple
    flip: bool  # horizontal flips are label-preserving
    offline: str  # "cifar" | "idx" | "tfds"
    default_dirs: tuple = ()


# CIFAR uses the reference's normalization (ImageNet's mean/std, as its loader does).
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATASETS = {
    "cifar10": DatasetInfo("cifar10", 10, (32, 32, 3), _IMAGENET_MEAN, _IMAGENET_STD, True, "cifar"),
    "cifar100": DatasetInfo("cifar100", 100, (32, 32, 3), _IMAGENET_MEAN, _IMAGENET_STD, True, "cifar"),
    "mnist": DatasetInfo("mnist", 10, (28, 28, 1), (0.1307,), (0.3081,), False, "idx"),
    "fashion_mnist": DatasetInfo(
        "fashion_mnist", 10, (28, 28, 1), (0.2860,), (0.3530,), True, "idx",
        ("/usr/share/datasets/fashion-mnist",),
    ),
    "imagenet2012": DatasetInfo(
        "imagenet2012", 1000, (224, 224, 3), _IMAGENET_MEAN, _IMAGENET_STD, True, "tfds"
    ),
}
SMALL_IMAGE_DATASETS = ("cifar10", "cifar100", "fashion_mnist", "mnist")


def info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


# ------------------------------------------------------------------ offline readers
_CIFAR = {
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py",
                [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python",
                 ["train"], ["test"], b"fine_labels"),
}
_IDX = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _cifar_batches_to_arrays(batches, label_key):
    images = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([np.asarray(b[label_key]) for b in batches])
    return images.transpose(0, 2, 3, 1).astype(np.uint8), labels.astype(np.int64)


def read_cifar(name: str, split: str, data_dir: str):
    """(images uint8 NHWC, labels) from the official python archive or its folder;
    None if neither is in data_dir."""
    archive, folder, train_files, test_files, label_key = _CIFAR[name]
    files = train_files if split == "train" else test_files
    folder_path = os.path.join(data_dir, folder)
    if os.path.isdir(folder_path):
        batches = []
        for f in files:
            with open(os.path.join(folder_path, f), "rb") as fh:
                batches.append(pickle.load(fh, encoding="bytes"))
        return _cifar_batches_to_arrays(batches, label_key)
    archive_path = os.path.join(data_dir, archive)
    if os.path.isfile(archive_path):
        with tarfile.open(archive_path, "r:gz") as tar:
            batches = [
                pickle.load(tar.extractfile(f"{folder}/{f}"), encoding="bytes") for f in files
            ]
        return _cifar_batches_to_arrays(batches, label_key)
    return None


def _read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def read_idx(split: str, data_dir: str):
    """(images uint8 NHWC, labels) from the original (Fashion-)MNIST idx .gz files."""
    image_file, label_file = _IDX[split]
    image_path, label_path = (os.path.join(data_dir, f) for f in (image_file, label_file))
    if not (os.path.isfile(image_path) and os.path.isfile(label_path)):
        return None
    images, labels = _read_idx(image_path), _read_idx(label_path)
    return images[..., None], labels.astype(np.int64)


def _offline_help(ds: DatasetInfo, data_dir) -> str:
    where = data_dir or "<--data-dir>"
    if ds.offline == "cifar":
        archive, folder = _CIFAR[ds.name][:2]
        files = f"{where}/{archive} (or its extracted folder {where}/{folder}/)"
    elif ds.offline == "idx":
        files = ", ".join(f"{where}/{f}" for pair in _IDX.values() for f in pair)
        if ds.name == "fashion_mnist":
            files += " (on Debian: apt-get install dataset-fashion-mnist)"
    else:
        files = f"TFDS's prepared {ds.name} in {where} (ImageNet needs TFDS's manual download)"
    return f"put {files}, or use a machine that can download it with tensorflow-datasets"


def load_arrays(name: str, split: str, data_dir: str | None = None, download: bool = True):
    """(images uint8 NHWC, labels int64) of a small-image dataset split ("train"/"test").

    Looks for the official offline files in data_dir (and the dataset's default
    folders), then asks TFDS (data_dir is TFDS's data_dir). Raises DataNotFoundError
    naming the files to provide when neither works.
    """
    ds = info(name)
    if name not in SMALL_IMAGE_DATASETS:
        raise ValueError(f"{name} is not a small-image dataset; use `imagenet_dataset`")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test' (got {split!r})")
    if data_dir is not None and not os.path.isdir(data_dir):
        raise DataNotFoundError(
            f"data directory {data_dir} does not exist; {_offline_help(ds, data_dir)}"
        )
    for directory in ([data_dir] if data_dir else []) + list(ds.default_dirs):
        found = (read_cifar(name, split, directory) if ds.offline == "cifar"
                 else read_idx(split, directory))
        if found is not None:
            return found
    return _load_tfds_arrays(ds, split, data_dir, download)


def _load_tfds_arrays(ds: DatasetInfo, split, data_dir, download):
    import tensorflow_datasets as tfds

    try:
        data = tfds.load(ds.name, split=split, data_dir=data_dir, as_supervised=True,
                         download=download)
    except Exception as error:  # TFDS raises many kinds when offline
        raise DataNotFoundError(
            f"{ds.name} ({split}) not found offline and tensorflow-datasets could not "
            f"provide it ({type(error).__name__}: {str(error).splitlines()[0][:160]}); "
            f"{_offline_help(ds, data_dir)}"
        ) from None
    # Large batches, not batch_size=-1: TFDS's mock_data aborts the process on that.
    chunks = list(data.batch(10_000).as_numpy_iterator())
    if not chunks:
        raise DataNotFoundError(f"{ds.name} ({split}) is empty in {data_dir or 'TFDS'}")
    images = np.concatenate([c[0] for c in chunks]).astype(np.uint8)
    labels = np.concatenate([c[1] for c in chunks])
    if images.ndim == 3:
        images = images[..., None]
    return images, np.asarray(labels, dtype=np.int64)


# ---------------------------------------------------------------------- pipelines
def normalize(images, ds: DatasetInfo):
    images = tf.cast(images, tf.float32) / 255.0
    return (images - tf.constant(ds.mean)) / tf.constant(ds.std)


def _augment(image, seed, ds: DatasetInfo):
    """Random crop with 4-pixel zero padding, and horizontal flip where label-safe."""
    h, w, c = ds.image_shape[0], ds.image_shape[1], image.shape[-1]
    padded = tf.pad(image, [[4, 4], [4, 4], [0, 0]])
    image = tf.image.stateless_random_crop(padded, (h, w, c), seed=seed)
    if ds.flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=seed[::-1])
    return image


def train_dataset(images, labels, ds: DatasetInfo, batch_size: int, seed: int,
                  first_epoch: int, epochs: int) -> tf.data.Dataset:
    """Batches of epochs [first_epoch, epochs): per-epoch permutation and augmentation
    are pure functions of (seed, epoch, index), so a resumed run is the same run."""
    n = len(images)
    images_t, labels_t = tf.constant(images), tf.constant(labels)
    num_batches = -(-n // batch_size)

    def one_epoch(epoch):
        def example(i):
            key = tf.stack([tf.cast(seed, tf.int64), epoch])
            j = tf.random.experimental.index_shuffle(i, key, n - 1)
            item_seed = tf.stack([tf.cast(seed, tf.int64) * 1000003 + epoch, i])
            return _augment(images_t[j], item_seed, ds), labels_t[j]

        return (tf.data.Dataset.range(n)
                .map(example, num_parallel_calls=tf.data.AUTOTUNE)
                .batch(batch_size)
                .map(lambda x, y: (normalize(x, ds), y), num_parallel_calls=tf.data.AUTOTUNE))

    return (tf.data.Dataset.range(first_epoch, epochs)
            .flat_map(one_epoch)
            .prefetch(tf.data.AUTOTUNE)), num_batches


def without_autotune(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Deleting an iterator of an autotuned dataset waits for the autotune thread's next
    wake-up (up to ~0.5 s here). Datasets iterated anew each epoch (evaluation) turn
    autotuning off and use explicit parallelism instead."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def eval_dataset(images, labels, ds: DatasetInfo, batch_size: int) -> tf.data.Dataset:
    return without_autotune(
        tf.data.Dataset.from_tensor_slices((images, labels))
        .batch(batch_size)
        .map(lambda x, y: (normalize(x, ds), y), num_parallel_calls=os.cpu_count() or 1)
        .prefetch(2))


# ------------------------------------------------------------------------ ImageNet
def imagenet_dataset(split: str, data_dir: str | None, batch_size: int, training: bool,
                     seed: int = 0, download: bool = False) -> tf.data.Dataset:
    """ImageNet from TFDS (prepared in data_dir). Train: random-resized crop
    (area 8%-100%) + flip; eval: resize short side to 256, center crop 224."""
    import tensorflow_datasets as tfds

    ds = info("imagenet2012")
    try:
        data = tfds.load("imagenet2012", split=split, data_dir=data_dir, as_supervised=True,
                         shuffle_files=training, download=download)
    except Exception as error:
        raise DataNotFoundError(
            f"imagenet2012 ({split}) not available: {type(error).__name__}; "
            f"{_offline_help(ds, data_dir)}"
        ) from None

    def train_map(image, label):
        begin, size, _ = tf.image.sample_distorted_bounding_box(
            tf.shape(image), tf.zeros([0, 0, 4]), area_range=(0.08, 1.0),
            aspect_ratio_range=(3 / 4, 4 / 3), use_image_if_no_bounding_boxes=True)
        image = tf.image.resize(tf.slice(image, begin, size), (224, 224))
        return normalize(tf.image.random_flip_left_right(image), ds), label

    def eval_map(image, label):
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        scale = 256.0 / tf.reduce_min(shape)
        image = tf.image.resize(image, tf.cast(tf.round(shape * scale), tf.int32))
        image = tf.image.resize_with_crop_or_pad(image, 224, 224)
        return normalize(image, ds), label

    if training:
        data = data.shuffle(10_000, seed=seed)
    return (data.map(train_map if training else eval_map, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size).prefetch(tf.data.AUTOTUNE))
