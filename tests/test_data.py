"""Offline readers on files in the official formats (written here), TFDS via
mock_data, clear errors, and deterministic per-epoch pipelines."""

import gzip
import os
import pickle
import tarfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from reste_larq import data


def write_cifar10(root, n_per_batch=4, archive=False, seed=0):
    """A tiny CIFAR-10 in the official python format: 5 data batches + test batch of
    rows of 3072 bytes (R plane, G plane, B plane) and a `labels` list."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    images, labels = {}, {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        imgs = rng.integers(0, 256, (n_per_batch, 32, 32, 3), dtype=np.uint8)
        labs = [int(v) for v in rng.integers(0, 10, n_per_batch)]  # Python ints, as theirs
        rows = imgs.transpose(0, 3, 1, 2).reshape(n_per_batch, 3072)
        batch = {
            b"batch_label": name.encode(),
            b"labels": labs,
            b"data": rows,
            b"filenames": [f"img_{i}.png".encode() for i in range(n_per_batch)],
        }
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)  # the official files: Python 2's protocol 2
        images[name], labels[name] = imgs, labs
    if archive:
        with tarfile.open(os.path.join(root, "cifar-10-python.tar.gz"), "w:gz") as tar:
            tar.add(folder, arcname="cifar-10-batches-py")
        for f in os.listdir(folder):
            os.remove(os.path.join(folder, f))
        os.rmdir(folder)
    train_x = np.concatenate([images[f"data_batch_{i}"] for i in range(1, 6)])
    train_y = np.concatenate([labels[f"data_batch_{i}"] for i in range(1, 6)])
    return (train_x, train_y), (images["test_batch"], np.array(labels["test_batch"]))


def write_idx(root, split, images, labels):
    image_file, label_file = data._IDX[split]
    header = b"\x00\x00\x08\x03" + b"".join(int(d).to_bytes(4, "big") for d in images.shape)
    with gzip.open(os.path.join(root, image_file), "wb") as f:
        f.write(header + images.astype(np.uint8).tobytes())
    with gzip.open(os.path.join(root, label_file), "wb") as f:
        f.write(
            b"\x00\x00\x08\x01" + len(labels).to_bytes(4, "big") + labels.astype(np.uint8).tobytes()
        )


@pytest.mark.parametrize("archive", [False, True])
def test_cifar10_official_format(tmp_path, archive):
    (train_x, train_y), (test_x, test_y) = write_cifar10(str(tmp_path), archive=archive)
    x, y = data.load_arrays("cifar10", "train", str(tmp_path))
    np.testing.assert_array_equal(x, train_x)
    np.testing.assert_array_equal(y, train_y)
    x, y = data.load_arrays("cifar10", "test", str(tmp_path))
    np.testing.assert_array_equal(x, test_x)
    assert x.dtype == np.uint8 and x.shape == (4, 32, 32, 3)


def test_cifar100_official_format(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    for name in ("train", "test"):
        with open(folder / name, "wb") as f:
            pickle.dump(
                {
                    b"data": imgs.transpose(0, 3, 1, 2).reshape(3, -1),
                    b"fine_labels": [5, 99, 0],
                    b"coarse_labels": [1, 2, 3],
                },
                f,
            )
    x, y = data.load_arrays("cifar100", "test", str(tmp_path))
    np.testing.assert_array_equal(x, imgs)
    np.testing.assert_array_equal(y, [5, 99, 0])


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_format(tmp_path, name):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 5)
    write_idx(str(tmp_path), "test", images, labels)
    x, y = data.load_arrays(name, "test", str(tmp_path))
    np.testing.assert_array_equal(x[..., 0], images)
    np.testing.assert_array_equal(y, labels)


@pytest.mark.skipif(
    not os.path.isdir("/usr/share/datasets/fashion-mnist"),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_debian_fashion_mnist_is_found_without_data_dir():
    x, y = data.load_arrays("fashion_mnist", "test")
    assert x.shape == (10000, 28, 28, 1) and set(np.unique(y)) == set(range(10))


def test_a_data_dir_without_the_files_is_an_error_not_another_copy(tmp_path, monkeypatch):
    """The default folder (Debian's, here a made-up one) is searched only without
    --data-dir: a data_dir that lacks the files must not train on some other copy.
    The arrays' source is reported for the log and metrics.json."""
    import dataclasses

    default, empty = tmp_path / "debian", tmp_path / "mine"
    default.mkdir()
    empty.mkdir()
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    write_idx(str(default), "test", images, np.array([1, 2, 3]))
    ds = dataclasses.replace(data.DATASETS["fashion_mnist"], default_dirs=(str(default),))
    monkeypatch.setitem(data.DATASETS, "fashion_mnist", ds)
    x, _, source = data.load_arrays("fashion_mnist", "test", download=False, return_source=True)
    np.testing.assert_array_equal(x[..., 0], images)
    assert source == f"official files in {default}"
    with pytest.raises(data.DataNotFoundError, match=f"{empty}/t10k-images-idx3-ubyte.gz"):
        data.load_arrays("fashion_mnist", "test", str(empty), download=False)


def test_tfds_mock_data():
    with tfds.testing.mock_data(num_examples=12):
        x, y = data.load_arrays("cifar10", "train", download=False)
    assert x.shape == (12, 32, 32, 3) and x.dtype == np.uint8 and y.shape == (12,)


def test_missing_data_dir_names_the_files(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(data.DataNotFoundError, match="cifar-10-python.tar.gz"):
        data.load_arrays("cifar10", "train", missing)


def test_no_data_and_no_download_names_the_files(tmp_path):
    with pytest.raises(data.DataNotFoundError) as error:
        data.load_arrays("mnist", "train", str(tmp_path), download=False)
    assert "train-images-idx3-ubyte.gz" in str(error.value)
    assert str(tmp_path) in str(error.value)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="choose one of cifar10, cifar100"):
        data.info("svhn")


def _batches(ds):
    return [(x.numpy(), y.numpy()) for x, y in ds]


def test_train_pipeline_is_a_function_of_seed_and_epoch():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(10)
    info = data.info("cifar10")
    full, steps = data.train_dataset(images, labels, info, 4, seed=7, first_epoch=0, epochs=3)
    assert steps == 3
    full = _batches(full)
    assert len(full) == 9 and full[2][0].shape == (2, 32, 32, 3)  # last partial batch kept
    resumed, _ = data.train_dataset(images, labels, info, 4, seed=7, first_epoch=1, epochs=3)
    for (a, b), (c, d) in zip(full[3:], _batches(resumed)):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
    # each epoch is a permutation of all examples, different between epochs
    epoch_labels = [np.concatenate([y for _, y in full[3 * e : 3 * e + 3]]) for e in range(3)]
    for e in epoch_labels:
        assert sorted(e) == list(range(10))
    assert not np.array_equal(epoch_labels[0], epoch_labels[1])
    other_seed = _batches(
        data.train_dataset(images, labels, info, 4, seed=8, first_epoch=0, epochs=1)[0]
    )
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(full, other_seed))


def test_augmentation_is_crop_and_flip_of_the_image():
    image = np.arange(32 * 32 * 3, dtype=np.int64).reshape(32, 32, 3) % 251
    info = data.info("cifar10")
    seen_flip = seen_shift = False
    for i in range(20):
        out = data._augment(
            tf.constant(image.astype(np.uint8)), tf.constant([3, i], tf.int64), info
        ).numpy()
        padded = np.pad(image, [(4, 4), (4, 4), (0, 0)])
        matches = [
            (dy, dx, flip)
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
            if np.array_equal(
                out,
                (
                    padded[dy : dy + 32, dx : dx + 32][:, ::-1]
                    if flip
                    else padded[dy : dy + 32, dx : dx + 32]
                ),
            )
        ]
        assert matches, "output is not a 32x32 crop (maybe flipped) of the padded image"
        seen_flip |= any(m[2] for m in matches)
        seen_shift |= any(m[:2] != (4, 4) for m in matches)
    assert seen_flip and seen_shift


def crops_of(image, pad=4):
    """Every (dy, dx, flipped) crop of the zero-padded image, as a dict key -> crop."""
    h, w = image.shape[:2]
    padded = np.pad(image, [(pad, pad), (pad, pad), (0, 0)])
    return {
        (dy, dx, flip): (crop[:, ::-1] if flip else crop)
        for dy in range(2 * pad + 1)
        for dx in range(2 * pad + 1)
        for crop in [padded[dy : dy + h, dx : dx + w]]
        for flip in (False, True)
    }


@pytest.mark.parametrize("name, flips", [("mnist", False), ("fashion_mnist", True)])
def test_digits_are_never_mirrored_by_the_training_pipeline(name, flips):
    """MNIST digits are not left-right symmetric classes (a mirrored 2 is no 2): the
    training pipeline's every output is an unmirrored crop of its image; Fashion-MNIST's
    clothes may be mirrored, and are."""
    info = data.info(name)
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (8, 28, 28, 1), dtype=np.uint8)  # no symmetric image
    dataset, _ = data.train_dataset(images, np.arange(8), info, 4, seed=3, first_epoch=0, epochs=3)
    candidates = [crops_of(image) for image in images]
    mirrored = 0
    for x, y in dataset:
        for out, label in zip(x.numpy(), y.numpy()):
            pixels = np.rint((out * np.array(info.std) + np.array(info.mean)) * 255)
            found = [key for key, crop in candidates[label].items() if np.array_equal(pixels, crop)]
            assert found, "not a crop of its image"
            mirrored += all(flip for _, _, flip in found)
    assert (mirrored > 0) == flips, mirrored


def test_normalization_uses_reference_statistics():
    info = data.info("cifar10")
    white = data.normalize(tf.fill((1, 1, 1, 3), tf.constant(255, tf.uint8)), info).numpy().ravel()
    np.testing.assert_allclose(
        white, (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]), rtol=1e-6
    )


# ------------------------------------------------------------------ bad files
def _write_cifar_batch(path, rows, labels):
    with open(path, "wb") as f:
        pickle.dump({b"data": rows, b"labels": labels}, f)


def bad_cifar(kind, root):
    """A CIFAR-10 folder or archive damaged in one way; returns the file to blame."""
    write_cifar10(root, n_per_batch=2)
    folder = os.path.join(root, "cifar-10-batches-py")
    test_batch = os.path.join(folder, "test_batch")
    if kind == "corrupt archive":
        import shutil

        shutil.rmtree(folder)
        path = os.path.join(root, "cifar-10-python.tar.gz")
        with open(path, "wb") as f:
            f.write(b"<html>not the archive</html>")
        return path, "not a readable .tar.gz"
    if kind == "archive without test_batch":
        import shutil

        shutil.rmtree(folder)
        path = os.path.join(root, "cifar-10-python.tar.gz")
        with tarfile.open(path, "w:gz") as tar:
            info = tarfile.TarInfo("cifar-10-batches-py/readme.html")
            tar.addfile(info, fileobj=None)
        return path, "has no cifar-10-batches-py/test_batch"
    if kind == "missing test_batch":
        os.remove(test_batch)
        return test_batch, "is missing"
    if kind == "not a pickle":
        with open(test_batch, "wb") as f:
            f.write(b"\x00garbage")
        return test_batch, "is not a CIFAR python batch"
    if kind == "truncated pickle":
        with open(test_batch, "rb") as f:
            content = f.read()
        with open(test_batch, "wb") as f:
            f.write(content[: len(content) // 2])
        return test_batch, "is not a CIFAR python batch"
    if kind == "code in the pickle":
        with open(test_batch, "wb") as f:
            pickle.dump(RunsCode(os.path.join(root, "payload_ran")), f)
        return test_batch, "names posix.system, which CIFAR files never do"
    if kind == "wrong row size":
        _write_cifar_batch(test_batch, np.zeros((2, 3000), np.uint8), [0, 1])
        return test_batch, "expected N rows of 3072 bytes"
    if kind == "label out of range":
        _write_cifar_batch(test_batch, np.zeros((2, 3072), np.uint8), [3, 10])
        return folder, "labels must be in 0..9, found 3..10"
    if kind == "label count":
        _write_cifar_batch(test_batch, np.zeros((2, 3072), np.uint8), [3])
        return folder, "2 images but 1 labels"
    raise AssertionError(kind)


class RunsCode:
    """Unpickled by `pickle.load`, this runs a shell command: it touches `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


CIFAR_FAULTS = [
    "code in the pickle",
    "corrupt archive",
    "archive without test_batch",
    "missing test_batch",
    "not a pickle",
    "truncated pickle",
    "wrong row size",
    "label out of range",
    "label count",
]


@pytest.mark.parametrize("kind", CIFAR_FAULTS)
def test_damaged_cifar_files_name_the_file_and_the_fault(tmp_path, kind):
    blamed, message = bad_cifar(kind, str(tmp_path))
    with pytest.raises(data.DataFormatError) as error:
        data.load_arrays("cifar10", "test", str(tmp_path))
    text = str(error.value)
    assert blamed in text and message in text and "\n" not in text, text
    assert not os.path.exists(os.path.join(str(tmp_path), "payload_ran"))


def bad_idx(kind, root):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (4, 28, 28)), rng.integers(0, 10, 4)
    write_idx(root, "test", images, labels)
    image_path, label_path = (os.path.join(root, f) for f in data._IDX["test"])
    if kind == "not gzip":
        with open(image_path, "wb") as f:
            f.write(b"plain bytes")
        return image_path, "not a readable .gz file"
    if kind == "truncated gzip":
        with open(image_path, "rb") as f:
            content = f.read()
        with open(image_path, "wb") as f:
            f.write(content[: len(content) // 2])
        return image_path, "not a readable .gz file"
    if kind == "truncated data":
        with gzip.open(image_path, "rb") as f:
            content = f.read()
        with gzip.open(image_path, "wb") as f:
            f.write(content[:-100])
        return image_path, "its header says 4x28x28 = 3136"
    if kind == "wrong magic":
        with gzip.open(label_path, "wb") as f:
            f.write(b"\x00\x00\x0d\x01" + (4).to_bytes(4, "big") + bytes(16))
        return label_path, "not an idx file of unsigned bytes"
    if kind == "images for labels":  # files swapped
        os.replace(image_path, label_path + ".tmp")
        os.replace(label_path, image_path)
        os.replace(label_path + ".tmp", label_path)
        return image_path, "with 3 dimension(s)"
    if kind == "label out of range":
        write_idx(root, "test", images, np.array([1, 2, 12, 0]))
        return label_path, "labels must be in 0..9, found 0..12"
    if kind == "count mismatch":
        write_idx(root, "test", images, labels[:3])
        return label_path, "has 4 images but"
    raise AssertionError(kind)


IDX_FAULTS = [
    "not gzip",
    "truncated gzip",
    "truncated data",
    "wrong magic",
    "images for labels",
    "label out of range",
    "count mismatch",
]


@pytest.mark.parametrize("kind", IDX_FAULTS)
def test_damaged_idx_files_name_the_file_and_the_fault(tmp_path, kind):
    blamed, message = bad_idx(kind, str(tmp_path))
    with pytest.raises(data.DataFormatError) as error:
        data.load_arrays("mnist", "test", str(tmp_path))
    text = str(error.value)
    assert blamed in text and message in text and "\n" not in text, text
    assert not os.path.exists(os.path.join(str(tmp_path), "payload_ran"))


def test_reflect_padded_crops_hold_only_image_pixels():
    """The 1-bit WRN code's crops pad by reflection: no crop of an image without zeros
    contains a zero; zero padding does (for crops that reach the border)."""
    ds = data.info("cifar10")
    image = tf.constant(np.random.default_rng(0).integers(1, 256, (32, 32, 3)), tf.uint8)
    seeds = [tf.constant([s, 1], tf.int64) for s in range(40)]
    reflect = [data._augment(image, s, ds, "reflect").numpy() for s in seeds]
    zero = [data._augment(image, s, ds, "zero").numpy() for s in seeds]
    assert min(c.min() for c in reflect) > 0
    assert sum((c == 0).all(axis=-1).any() for c in zero) > 20
    # a crop with offset (0, 0) starts with the reflection of rows/columns 4..1
    padded = np.pad(image.numpy(), [(4, 4), (4, 4), (0, 0)], mode="reflect")
    assert (padded[0, 4:-4] == image.numpy()[4]).all()
    assert any(
        (c == padded[dy : dy + 32, dx : dx + 32]).all()
        or (c == padded[dy : dy + 32, dx : dx + 32][:, ::-1]).all()
        for c in reflect[:1]
        for dy in range(9)
        for dx in range(9)
    )


def test_wrn_mean_std_are_the_1bit_wrn_codes():
    ds = data.with_mean_std(data.info("cifar100"), "wrn")
    # szagoruyko/binary-wide-resnet main.py: Normalize([125.3, 123.0, 113.9] / 255,
    # [63.0, 62.1, 66.7] / 255)
    np.testing.assert_allclose(np.array(ds.mean) * 255, [125.3, 123.0, 113.9])
    np.testing.assert_allclose(np.array(ds.std) * 255, [63.0, 62.1, 66.7])
    assert data.with_mean_std(data.info("cifar10"), "dataset") == data.info("cifar10")
    with pytest.raises(ValueError, match="grayscale"):
        data.with_mean_std(data.info("fashion_mnist"), "wrn")


def test_rotation_turns_the_image_about_its_centre():
    image = tf.reshape(tf.range(1, 26, dtype=tf.float32), [5, 5, 1])
    np.testing.assert_array_equal(data.rotate_image(image, 0.0), image)
    # +90 degrees is counter-clockwise (Keras' and torchvision's convention)
    np.testing.assert_array_equal(data.rotate_image(image, 90.0)[..., 0], np.rot90(image[..., 0]))
    turned = data.rotate_image(image, 45.0).numpy()[..., 0]
    assert turned[2, 2] == 13 and turned[0, 0] == 0  # centre kept, corners filled with 0


def test_mixup_mixes_pairs_with_one_lambda_and_soft_labels():
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(6, 4, 4, 1)), tf.float32)
    y = tf.constant([0, 1, 2, 3, 4, 5], tf.int64)  # distinct: each row's lambda is readable
    seed = tf.constant([3, 4], tf.int64)
    mixed, soft = (t.numpy() for t in data.mixup_batch(x, y, seed, 0.4, 10))
    again, _ = data.mixup_batch(x, y, seed, 0.4, 10)
    np.testing.assert_array_equal(mixed, again)
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, rtol=1e-6)
    lams = soft[np.arange(6), y.numpy()]
    for i in range(6):
        j = [k for k in range(6) if soft[i, k] > 0 and k != i] or [i]
        lam = lams[i] if j[0] != i else 1.0
        np.testing.assert_allclose(
            mixed[i], lam * x.numpy()[i] + (1 - lam) * x.numpy()[j[0]], rtol=1e-5, atol=1e-6
        )
    # one lambda per batch (the larger share is the image's own, or its partner's)
    shares = {round(max(l, 1 - l), 5) for l in lams if 0 < l < 1}
    assert len(shares) <= 1


def test_rotation_and_mixup_resume_exactly():
    images = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(24) % 10
    ds = data.info("cifar10")
    kw = dict(rotate=15.0, mixup=0.2)
    full, _ = data.train_dataset(images, labels, ds, 8, 7, 0, 3, **kw)
    resumed, _ = data.train_dataset(images, labels, ds, 8, 7, 2, 3, **kw)
    full, resumed = list(full.as_numpy_iterator()), list(resumed.as_numpy_iterator())
    assert full[0][1].shape == (8, 10)  # soft labels
    for (xa, ya), (xb, yb) in zip(full[6:], resumed):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    plain, _ = data.train_dataset(images, labels, ds, 8, 7, 0, 1)
    assert not np.allclose(next(iter(plain))[0], full[0][0])
