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
import math
import os
import pickle
import tarfile

import numpy as np
import tensorflow as tf

from reste_larq.errors import ConfigError, DataFormatError, DataNotFoundError


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
    "cifar10": DatasetInfo(
        "cifar10", 10, (32, 32, 3), _IMAGENET_MEAN, _IMAGENET_STD, True, "cifar"
    ),
    "cifar100": DatasetInfo(
        "cifar100", 100, (32, 32, 3), _IMAGENET_MEAN, _IMAGENET_STD, True, "cifar"
    ),
    "mnist": DatasetInfo("mnist", 10, (28, 28, 1), (0.1307,), (0.3081,), False, "idx"),
    "fashion_mnist": DatasetInfo(
        "fashion_mnist",
        10,
        (28, 28, 1),
        (0.2860,),
        (0.3530,),
        True,
        "idx",
        ("/usr/share/datasets/fashion-mnist",),
    ),
    "imagenet2012": DatasetInfo(
        "imagenet2012", 1000, (224, 224, 3), _IMAGENET_MEAN, _IMAGENET_STD, True, "tfds"
    ),
}
SMALL_IMAGE_DATASETS = ("cifar10", "cifar100", "fashion_mnist", "mnist")
# The 1-bit WRN code's normalization (szagoruyko/binary-wide-resnet): CIFAR-10's RGB
# statistics, used there for CIFAR-10 and CIFAR-100 alike.
WRN_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
WRN_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
MEAN_STD = ("dataset", "wrn")


def with_mean_std(ds: "DatasetInfo", which: str) -> "DatasetInfo":
    """`ds` normalized by its own statistics ("dataset", this project's default: the
    ReSTE reference's for CIFAR) or by the 1-bit WRN code's ("wrn", RGB only)."""
    if which == "dataset":
        return ds
    if which != "wrn":
        raise ConfigError(f"mean/std must be one of {', '.join(MEAN_STD)} (got {which!r})")
    if ds.image_shape[-1] != 3:
        raise ConfigError(
            f"the WRN mean/std are RGB statistics and {ds.name} is grayscale; "
            "normalize it by its own (mean/std 'dataset', --mean-std dataset)"
        )
    return dataclasses.replace(ds, mean=WRN_MEAN, std=WRN_STD)


def info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


# ------------------------------------------------------------------ offline readers
_CIFAR = {
    "cifar10": (
        "cifar-10-python.tar.gz",
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        b"labels",
    ),
    "cifar100": (
        "cifar-100-python.tar.gz",
        "cifar-100-python",
        ["train"],
        ["test"],
        b"fine_labels",
    ),
}
_IDX = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _checked(images, labels, path, num_classes, image_shape):
    """Validate what a reader produced: shapes, counts, label range."""
    if images.shape[1:] != tuple(image_shape):
        raise DataFormatError(
            f"{path}: images are {'x'.join(map(str, images.shape[1:]))}, expected "
            f"{'x'.join(map(str, image_shape))}"
        )
    if len(images) != len(labels):
        raise DataFormatError(f"{path}: {len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataFormatError(
            f"{path}: labels must be in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}"
        )
    return images, labels


class _CifarUnpickler(pickle.Unpickler):
    """Reads what the official CIFAR python batches hold (dicts, lists, bytes, str, ints
    and numpy uint8 arrays) and nothing else: `pickle.load` would call any function a
    file names, so a crafted file in --data-dir would run code. numpy arrays pickle as
    `_reconstruct(ndarray, ...)` plus their dtype; Python 3 writes bytes at protocol 2
    as `_codecs.encode`."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which CIFAR files never do")
        return super().find_class(module, name)


def _cifar_batch(fh, path, label_key):
    """(images NHWC uint8, labels) of one official CIFAR python pickle."""
    try:
        batch = _CifarUnpickler(fh, encoding="bytes").load()
    except Exception as error:  # truncated, not a pickle, or a global it may not name
        raise DataFormatError(
            f"{path} is not a CIFAR python batch ({type(error).__name__}: {error}); "
            "re-extract it from the official archive"
        ) from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise DataFormatError(
            f"{path} is not a CIFAR python batch: expected a dict with b'data' and {label_key!r}"
        )
    rows = np.asarray(batch[b"data"])
    if rows.ndim != 2 or rows.shape[1] != 3 * 32 * 32:
        raise DataFormatError(
            f"{path}: data is {rows.shape}, expected N rows of 3072 bytes (32x32x3)"
        )
    images = rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.uint8)
    return images, np.asarray(batch[label_key]).astype(np.int64)


def read_cifar(name: str, split: str, data_dir: str):
    """(images uint8 NHWC, labels) from the official python archive or its folder;
    None if neither is in data_dir. A damaged file raises DataFormatError naming it."""
    archive, folder, train_files, test_files, label_key = _CIFAR[name]
    files = train_files if split == "train" else test_files
    num_classes = DATASETS[name].num_classes
    folder_path = os.path.join(data_dir, folder)
    archive_path = os.path.join(data_dir, archive)
    batches = []
    if os.path.isdir(folder_path):
        for f in files:
            path = os.path.join(folder_path, f)
            if not os.path.isfile(path):
                raise DataFormatError(
                    f"{path} is missing: {folder_path}/ must hold {', '.join(files)} "
                    f"({split}); re-extract {archive}"
                )
            with open(path, "rb") as fh:
                batches.append(_cifar_batch(fh, path, label_key))
        where = folder_path
    elif os.path.isfile(archive_path):
        try:
            with tarfile.open(archive_path, "r:gz") as tar:
                for f in files:
                    member = f"{folder}/{f}"
                    try:
                        fh = tar.extractfile(member)
                    except KeyError:
                        fh = None
                    if fh is None:
                        raise DataFormatError(
                            f"{archive_path} has no {member}; is it the official {archive}?"
                        )
                    batches.append(_cifar_batch(fh, f"{archive_path}:{member}", label_key))
        except (tarfile.TarError, EOFError, OSError) as error:  # not gzip, truncated
            raise DataFormatError(
                f"{archive_path} is not a readable .tar.gz ({type(error).__name__}: "
                f"{error}); download the official {archive} again"
            ) from None
        where = archive_path
    else:
        return None
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    return _checked(images, labels, where, num_classes, (32, 32, 3))


_IDX_UBYTE = 0x08


def _read_idx(path, ndim):
    """The array of one idx .gz file (unsigned bytes, `ndim` dimensions), validated."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:  # BadGzipFile is an OSError; EOFError: truncated
        raise DataFormatError(
            f"{path} is not a readable .gz file ({type(error).__name__}: {error})"
        ) from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != _IDX_UBYTE or data[3] != ndim:
        raise DataFormatError(
            f"{path} is not an idx file of unsigned bytes with {ndim} dimension(s) "
            f"(header {data[:4].hex() or 'empty'}, expected 000008{ndim:02x})"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataFormatError(f"{path} is truncated inside its header")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise DataFormatError(
            f"{path} holds {len(data) - header} bytes of data, its header says "
            f"{'x'.join(map(str, dims))} = {expected} (truncated or wrong file)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_idx(split: str, data_dir: str, name: str = "fashion_mnist"):
    """(images uint8 NHWC, labels) from the original (Fashion-)MNIST idx .gz files;
    None if they are not in data_dir. A damaged file raises DataFormatError naming it."""
    image_file, label_file = _IDX[split]
    image_path, label_path = (os.path.join(data_dir, f) for f in (image_file, label_file))
    if not (os.path.isfile(image_path) and os.path.isfile(label_path)):
        return None
    images, labels = _read_idx(image_path, 3), _read_idx(label_path, 1)
    ds = DATASETS[name]
    if len(images) != len(labels):
        raise DataFormatError(
            f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels"
        )
    return _checked(
        images[..., None], labels.astype(np.int64), label_path, ds.num_classes, ds.image_shape
    )


def _offline_help(ds: DatasetInfo, data_dir) -> str:
    where = data_dir or "<--data-dir>"
    if ds.offline == "cifar":
        archive, folder = _CIFAR[ds.name][:2]
        files = f"{where}/{archive} (or its extracted folder {where}/{folder}/)"
    elif ds.offline == "idx":
        files = ", ".join(f"{where}/{f}" for pair in _IDX.values() for f in pair)
        if ds.name == "fashion_mnist":
            files += (
                f" (on Debian: apt-get install dataset-fashion-mnist, and no data dir to read "
                f"{ds.default_dirs[0]})"
                if data_dir and ds.default_dirs
                else " (on Debian: apt-get install dataset-fashion-mnist)"
            )
    else:
        files = f"TFDS's prepared {ds.name} in {where} (ImageNet needs TFDS's manual download)"
    return f"put {files}, or use a machine that can download it with tensorflow-datasets"


def load_arrays(
    name: str,
    split: str,
    data_dir: str | None = None,
    download: bool = True,
    *,
    return_source: bool = False,
):
    """(images uint8 NHWC, labels int64) of a small-image dataset split ("train"/"test").

    With `data_dir`: the official offline files there, else TFDS with `data_dir` as
    its data_dir (prepared there, or downloaded into it with `download`); never another
    folder, so a data_dir without the files is an error, not silently some other copy.
    Without: the dataset's default folders (Debian's /usr/share/datasets/...), then
    TFDS's default data_dir. Raises DataNotFoundError naming the files to provide.
    `return_source=True` adds a third value, where the arrays came from (for logs and
    metrics.json), e.g. "official files in /data/cifar" or "tensorflow-datasets
    (data_dir ~/tensorflow_datasets)".
    """
    ds = info(name)
    if name not in SMALL_IMAGE_DATASETS:
        raise ConfigError(f"{name} is not a small-image dataset; use `imagenet_dataset`")
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test' (got {split!r})")
    if data_dir is not None and not os.path.isdir(data_dir):
        raise DataNotFoundError(
            f"data directory {data_dir} does not exist; {_offline_help(ds, data_dir)}"
        )
    found = None
    for directory in [data_dir] if data_dir else list(ds.default_dirs):
        found = (
            read_cifar(name, split, directory)
            if ds.offline == "cifar"
            else read_idx(split, directory, name)
        )
        if found is not None:
            source = f"official files in {os.path.abspath(directory)}"
            break
    if found is None:
        found = _load_tfds_arrays(ds, split, data_dir, download)
        source = f"tensorflow-datasets (data_dir {data_dir or _tfds_data_dir()})"
    return (*found, source) if return_source else found


def _tfds_data_dir():
    import tensorflow_datasets as tfds

    return tfds.core.constants.DATA_DIR


def _load_tfds_arrays(ds: DatasetInfo, split, data_dir, download):
    import tensorflow_datasets as tfds

    try:
        data = tfds.load(
            ds.name, split=split, data_dir=data_dir, as_supervised=True, download=download
        )
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


PAD_MODES = ("zero", "reflect")


def rotate_image(image, degrees):
    """Rotate an HxWxC image by `degrees` (counter-clockwise) about its centre, nearest
    neighbour, zero fill: torchvision's RandomRotation defaults."""
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)
    angle = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
    cos, sin = tf.cos(angle), tf.sin(angle)
    # output pixel (x, y) reads input (cos x - sin y + dx, sin x + cos y + dy)
    dx = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2.0
    dy = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2.0
    transform = tf.stack([cos, -sin, dx, sin, cos, dy, 0.0, 0.0])[None]
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=transform,
        output_shape=tf.shape(image)[:2],
        fill_value=0.0,
        interpolation="NEAREST",
        fill_mode="CONSTANT",
    )[0]


def _augment(image, seed, ds: DatasetInfo, pad_mode="zero", rotate=0.0):
    """Random crop with 4-pixel padding (zero, or reflect as the 1-bit WRN code),
    horizontal flip where label-safe, and a rotation uniform in [-rotate, rotate]
    degrees when asked (BNN-tricks' +-15)."""
    h, w, c = ds.image_shape[0], ds.image_shape[1], image.shape[-1]
    mode = {"zero": "CONSTANT", "reflect": "REFLECT"}[pad_mode]
    padded = tf.pad(image, [[4, 4], [4, 4], [0, 0]], mode=mode)
    image = tf.image.stateless_random_crop(padded, (h, w, c), seed=seed)
    if ds.flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=seed[::-1])
    if rotate:
        angle_seed = tf.random.experimental.stateless_fold_in(seed, 1)
        angle = tf.random.stateless_uniform([], angle_seed, -rotate, rotate)
        image = rotate_image(image, angle)
    return image


def mixup_batch(images, labels, seed, alpha: float, num_classes: int):
    """mixup (Zhang et al., 2018) of one batch: lambda ~ Beta(alpha, alpha), each image
    mixed with a permuted partner, labels become lambda one_hot(y) + (1 - lambda)
    one_hot(y_partner). Stateless in `seed`."""
    seeds = tf.random.experimental.stateless_split(seed, 3)
    g = [tf.random.stateless_gamma([], seeds[k], alpha) for k in range(2)]
    lam = g[0] / (g[0] + g[1])
    partner = tf.argsort(tf.random.stateless_uniform([tf.shape(images)[0]], seeds[2]))
    one_hot = tf.one_hot(tf.cast(tf.reshape(labels, [-1]), tf.int32), num_classes)
    mixed = lam * images + (1.0 - lam) * tf.gather(images, partner)
    return mixed, lam * one_hot + (1.0 - lam) * tf.gather(one_hot, partner)


def train_dataset(
    images,
    labels,
    ds: DatasetInfo,
    batch_size: int,
    seed: int,
    first_epoch: int,
    epochs: int,
    pad_mode: str = "zero",
    rotate: float = 0.0,
    mixup: float = 0.0,
) -> tf.data.Dataset:
    """Batches of epochs [first_epoch, epochs): per-epoch permutation and augmentation
    are pure functions of (seed, epoch, index), so a resumed run is the same run.
    pad_mode: the random crop's padding, "zero" (the ReSTE reference) or "reflect".
    rotate: random rotation of +-rotate degrees. mixup: Beta(mixup, mixup) mixing of
    each batch (labels become soft: `training.sparse_cross_entropy` takes them)."""
    if pad_mode not in PAD_MODES:
        raise ConfigError(f"pad_mode must be one of {', '.join(PAD_MODES)} (got {pad_mode!r})")
    if rotate < 0 or mixup < 0:
        raise ConfigError(f"rotate and mixup must be >= 0 (got {rotate}, {mixup})")
    n = len(images)
    images_t, labels_t = tf.constant(images), tf.constant(labels)
    num_batches = -(-n // batch_size)

    def one_epoch(epoch):
        epoch_seed = tf.cast(seed, tf.int64) * 1000003 + epoch

        def example(i):
            key = tf.stack([tf.cast(seed, tf.int64), epoch])
            j = tf.random.experimental.index_shuffle(i, key, n - 1)
            item_seed = tf.stack([epoch_seed, i])
            return _augment(images_t[j], item_seed, ds, pad_mode, rotate), labels_t[j]

        batches = (
            tf.data.Dataset.range(n)
            .map(example, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size)
            .map(lambda x, y: (normalize(x, ds), y), num_parallel_calls=tf.data.AUTOTUNE)
        )
        if mixup:
            # batch b's seed: (seed, epoch) folded with -1 - b, apart from the items' seeds
            batches = batches.enumerate().map(
                lambda b, xy: mixup_batch(
                    xy[0], xy[1], tf.stack([epoch_seed, -1 - b]), mixup, ds.num_classes
                ),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
        return batches

    return (
        tf.data.Dataset.range(first_epoch, epochs).flat_map(one_epoch).prefetch(tf.data.AUTOTUNE)
    ), num_batches


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
        .prefetch(2)
    )


# ------------------------------------------------------------------------ ImageNet
# PCA lighting (AlexNet; fb.resnet.torch and the BNN-tricks collection's `Lighting`):
# ImageNet's RGB eigenvalues and eigenvectors (columns) on [0, 1] pixels.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
IMAGENET_SHUFFLE_BUFFER = 10_000


def _load_imagenet(split, data_dir, download, limit):
    """The split as (encoded JPEG, label) in file order: decoding waits until after
    shuffling, so the shuffle buffer holds compressed bytes (~110 KB an image), not
    decoded ones (~500 KB)."""
    import tensorflow_datasets as tfds

    ds = info("imagenet2012")
    try:
        data = tfds.load(
            "imagenet2012",
            split=split,
            data_dir=data_dir,
            as_supervised=True,
            shuffle_files=False,  # the order is ours: a function of (seed, epoch)
            download=download,
            decoders={"image": tfds.decode.SkipDecoding()},
        )
    except Exception as error:
        raise DataNotFoundError(
            f"imagenet2012 ({split}) not available: {type(error).__name__}; "
            f"{_offline_help(ds, data_dir)}"
        ) from None
    if limit:
        data = data.take(limit)
    options = tf.data.Options()
    options.deterministic = True
    return data.with_options(options)


def color_jitter(image, seed, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1):
    """torchvision's ColorJitter on an RGB image in [0, 1]: brightness, contrast and
    saturation factors uniform in [1 - s, 1 + s], a hue shift uniform in [-hue, hue];
    applied in that fixed order (torchvision shuffles the order), clipped to [0, 1]
    after each step as torchvision does."""
    factors = tf.random.stateless_uniform([4], seed, -1.0, 1.0)
    gray_weights = tf.constant([0.299, 0.587, 0.114])

    def gray(x):
        return tf.reduce_sum(x * gray_weights, axis=-1, keepdims=True)

    image = tf.clip_by_value(image * (1.0 + brightness * factors[0]), 0.0, 1.0)
    mean = tf.reduce_mean(gray(image))
    image = tf.clip_by_value((image - mean) * (1.0 + contrast * factors[1]) + mean, 0.0, 1.0)
    g = gray(image)
    image = tf.clip_by_value((image - g) * (1.0 + saturation * factors[2]) + g, 0.0, 1.0)
    return tf.clip_by_value(tf.image.adjust_hue(image, hue * factors[3]), 0.0, 1.0)


def pca_lighting(image, seed, alphastd=0.1):
    """AlexNet's PCA lighting noise: add eigvec @ (alpha * eigval) to every pixel,
    alpha ~ N(0, alphastd) per component (image in [0, 1], before normalization)."""
    alpha = tf.random.stateless_normal([3], seed, stddev=alphastd)
    rgb = tf.linalg.matvec(tf.constant(IMAGENET_EIGVEC), alpha * tf.constant(IMAGENET_EIGVAL))
    return image + rgb


def _imagenet_train_image(encoded, seed, jitter, lighting):
    """Random-resized crop (area 8%-100%, aspect 3/4-4/3) decoded straight from the
    JPEG's crop window, resize 224, flip; all random draws stateless in `seed`."""
    seeds = tf.random.experimental.stateless_split(seed, 4)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.image.extract_jpeg_shape(encoded),
        tf.zeros([1, 0, 4]),
        seed=seeds[0],
        area_range=(0.08, 1.0),
        aspect_ratio_range=(3 / 4, 4 / 3),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
    image = tf.image.resize(image, (224, 224)) / 255.0
    image = tf.image.stateless_random_flip_left_right(image, seeds[1])
    if jitter:
        image = color_jitter(image, seeds[2])
    if lighting:
        image = pca_lighting(image, seeds[3])
    return image


def _imagenet_eval_image(encoded):
    """Resize the short side to 256, center crop 224."""
    image = tf.image.decode_jpeg(encoded, channels=3)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = 256.0 / tf.reduce_min(shape)
    image = tf.image.resize(image, tf.cast(tf.round(shape * scale), tf.int32))
    return tf.image.resize_with_crop_or_pad(image, 224, 224) / 255.0


def _normalize01(image, ds):
    return (image - tf.constant(ds.mean)) / tf.constant(ds.std)


def _count(data, data_dir) -> int:
    n = int(data.cardinality())
    if n <= 0:
        raise DataNotFoundError(
            f"imagenet2012 (train) in {data_dir or 'TFDS'} has no examples or an unknown count"
        )
    return n


def imagenet_train_count(data_dir, *, download=False, limit=None) -> int:
    """The number of training images `imagenet_train_dataset` reads."""
    return _count(_load_imagenet("train", data_dir, download, limit), data_dir)


def sharded_steps(n: int, batch_size: int) -> int:
    """Steps per epoch of an input sharded over workers: whole global batches only."""
    if n < batch_size:
        raise ConfigError(f"{n} training images make no whole batch of {batch_size}")
    return n // batch_size


def imagenet_train_dataset(
    data_dir: str | None,
    batch_size: int,
    seed: int,
    first_epoch: int,
    epochs: int,
    *,
    download: bool = False,
    limit: int | None = None,
    shuffle_buffer: int = IMAGENET_SHUFFLE_BUFFER,
    color_jitter: bool = False,
    lighting: bool = False,
    input_context: tf.distribute.InputContext | None = None,
) -> tuple[tf.data.Dataset, int]:
    """(batches of epochs [first_epoch, epochs), steps per epoch) of ImageNet's train
    split from TFDS (prepared in data_dir).

    Epoch e's order (a `shuffle_buffer` shuffle of the file order seeded by (seed, e))
    and its crops, flips, jitter and lighting (stateless, seeded by (seed, e, position))
    depend only on (seed, e): a resumed run sees the batches an uninterrupted one sees.
    JPEGs are decoded after the shuffle, and only their crop window.

    With an `input_context` of several input pipelines (the workers of a multi-worker
    run, `tf.distribute.Strategy.distribute_datasets_from_function`), each pipeline
    keeps every N-th position of the same shuffled epoch *before* decoding, and batches
    them by the per-replica batch: step k's batches across all replicas are global
    positions [k·B, (k+1)·B), the images one device would see in its batch k, and each
    JPEG is decoded by one worker only. The epoch is cut to whole global batches there
    (at most B - 1 images fewer), so every replica takes the same number of steps.
    """
    ds = info("imagenet2012")
    data = _load_imagenet("train", data_dir, download, limit)
    n = _count(data, data_dir)
    seed = tf.cast(seed, tf.int64)
    pipelines = input_context.num_input_pipelines if input_context else 1
    if pipelines > 1:
        replicas = input_context.num_replicas_in_sync
        if batch_size % replicas:
            raise ConfigError(
                f"batch size {batch_size} is not a multiple of the {replicas} replicas"
            )
        steps = sharded_steps(n, batch_size)
        per_replica = input_context.get_per_replica_batch_size(batch_size)

    def one_epoch(epoch):
        epoch_seed = seed * 1000003 + epoch
        # Inside this traced function set_seed sets only its graph's seed (the process's
        # global seed is untouched): the shuffle's seed pair is then (1, epoch_seed),
        # a function of (seed, epoch) alone. (With the graph seed left to a global seed
        # of 0, Dataset.shuffle cannot take a tensor seed at all.)
        tf.random.set_seed(1)
        positions = data.shuffle(
            shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False
        ).enumerate()
        if pipelines > 1:  # this worker's share, still encoded
            positions = positions.take(steps * batch_size).shard(
                pipelines, input_context.input_pipeline_id
            )
        return positions.map(
            lambda i, example: (
                _normalize01(
                    _imagenet_train_image(
                        example[0], tf.stack([epoch_seed, i]), color_jitter, lighting
                    ),
                    ds,
                ),
                example[1],
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        ).batch(per_replica if pipelines > 1 else batch_size, drop_remainder=pipelines > 1)

    train = tf.data.Dataset.range(first_epoch, epochs).flat_map(one_epoch)
    if pipelines > 1:
        options = tf.data.Options()  # sharded here: no second sharding by tf.distribute
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return train.prefetch(tf.data.AUTOTUNE).with_options(options), steps
    return train.prefetch(tf.data.AUTOTUNE), -(-n // batch_size)


def imagenet_eval_dataset(
    data_dir: str | None,
    batch_size: int,
    *,
    download: bool = False,
    limit: int | None = None,
) -> tf.data.Dataset:
    """ImageNet's validation split: resize 256, center crop 224, normalized."""
    ds = info("imagenet2012")
    data = _load_imagenet("validation", data_dir, download, limit)
    return without_autotune(
        data.map(
            lambda image, label: (_normalize01(_imagenet_eval_image(image), ds), label),
            num_parallel_calls=os.cpu_count() or 1,
        )
        .batch(batch_size)
        .prefetch(2)
    )
