"""ImageNet's pipeline on TFDS mock data: decoded after the shuffle (memory bounded by
compressed bytes), epoch order and augmentation a function of (seed, epoch), the
evaluation crop, and the optional colour jitter and PCA lighting."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from reste_larq import data
from reste_larq.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def batches(dataset):
    return [(x.numpy(), y.numpy()) for x, y in dataset]


def test_epoch_order_and_augmentation_depend_only_on_seed_and_epoch():
    with tfds.testing.mock_data(num_examples=12):
        full, steps = data.imagenet_train_dataset(None, 4, seed=3, first_epoch=0, epochs=3)
        resumed, _ = data.imagenet_train_dataset(None, 4, seed=3, first_epoch=1, epochs=3)
        other_seed, _ = data.imagenet_train_dataset(None, 4, seed=4, first_epoch=0, epochs=1)
        full, resumed, other_seed = batches(full), batches(resumed), batches(other_seed)
    assert steps == 3 and len(full) == 9 and len(resumed) == 6
    assert full[0][0].shape == (4, 224, 224, 3) and full[0][0].dtype == np.float32
    for (xa, ya), (xb, yb) in zip(full[3:], resumed):  # epochs 1-2 as a resumed run sees them
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    epoch_labels = [np.concatenate([y for _, y in full[e * 3 : e * 3 + 3]]) for e in range(3)]
    assert sorted(epoch_labels[0]) == sorted(epoch_labels[1])  # every example once an epoch
    assert not np.array_equal(epoch_labels[0], epoch_labels[1])  # in another order
    assert not np.array_equal(full[0][0], other_seed[0][0])


def box_from_ramp(values, length):
    """(begin, size, reversed) of the window a resized crop of a 0..255 ramp over
    `length` pixels shows: with half-pixel centres, output pixel i reads input
    begin + (i + 0.5) size / n - 0.5, and the ramp is linear, so a line fitted to the
    output's interior (away from the clamped borders) gives size and begin."""
    n = len(values)
    i = np.arange(8, n - 8)
    reversed_ = values[-1] < values[0]
    slope, intercept = np.polyfit(i, (values[::-1] if reversed_ else values)[i], 1)
    per_pixel = 255.0 / (length - 1)
    size = slope * n / per_pixel
    begin = intercept / per_pixel - (0.5 * size / n - 0.5)
    return int(round(begin)), int(round(size)), reversed_


def test_train_crop_is_a_random_resized_window_of_the_published_ranges():
    """On ramp images (red = row, green = column) the output tells which window it
    shows: each is a box of 8-100 % of the image with aspect 3/4-4/3 (the published
    random-resized crop), resized to 224 with the box sliced in numpy, flipped or not;
    boxes and flips vary with the seed."""
    h, w = 60, 80
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    image = np.stack(
        [np.rint(255 * rows / (h - 1)), np.rint(255 * cols / (w - 1)), np.full((h, w), 128)], -1
    ).astype(np.uint8)
    encoded = tf.io.encode_jpeg(image, quality=100)
    decoded = tf.io.decode_jpeg(encoded).numpy().astype(np.float32)
    boxes, flips = set(), set()
    for k in range(12):
        out = data._imagenet_train_image(encoded, tf.constant([5, k], tf.int64), False, False)
        out = out.numpy() * 255.0
        top, height, upside_down = box_from_ramp(out[:, 112, 0], h)
        left, width, flipped = box_from_ramp(out[112, :, 1], w)
        assert not upside_down
        assert 0 <= top and top + height <= h and 0 <= left and left + width <= w
        assert 0.08 <= height * width / (h * w) <= 1.0, (height, width)
        assert 3 / 4 - 0.05 <= width / height <= 4 / 3 + 0.05, (height, width)
        window = decoded[top : top + height, left : left + width]
        expected = tf.image.resize(window[:, ::-1] if flipped else window, (224, 224)).numpy()
        assert np.abs(out - expected).mean() < 1.0  # JPEG's rounding, in 0..255 levels
        boxes.add((top, left, height, width))
        flips.add(flipped)
    assert len(boxes) >= 8 and flips == {False, True}


def test_eval_is_resize_256_center_crop_224():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    encoded = tf.io.encode_jpeg(image, quality=100)
    out = data._imagenet_eval_image(encoded).numpy()
    decoded = tf.io.decode_jpeg(encoded).numpy().astype(np.float32)
    resized = tf.image.resize(decoded, (256, 341)).numpy()  # short side 256
    top, left = (256 - 224) // 2, (341 - 224) // 2
    np.testing.assert_allclose(out, resized[top : top + 224, left : left + 224] / 255.0, atol=1e-5)


def test_color_jitter_and_lighting_are_seeded_and_bounded():
    image = tf.random.stateless_uniform([32, 32, 3], [1, 2])
    a = data.color_jitter(image, tf.constant([1, 1], tf.int64)).numpy()
    b = data.color_jitter(image, tf.constant([1, 1], tf.int64)).numpy()
    c = data.color_jitter(image, tf.constant([1, 2], tf.int64)).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, image.numpy())
    assert a.min() >= 0.0 and a.max() <= 1.0
    # Lighting adds one RGB offset to every pixel: AlexNet's PCA noise, as published
    # (fb.resnet.torch's Lighting, PyTorch's ImageNet example): eigenvalues 0.2175,
    # 0.0188, 0.0045 and their eigenvectors as columns, rows R, G, B; the first is
    # the luminance direction (equal on R, G and B).
    eigval = [0.2175, 0.0188, 0.0045]
    eigvec = [
        [-0.5675, 0.7192, 0.4009],
        [-0.5808, -0.0045, -0.8140],
        [-0.5836, -0.6948, 0.4203],
    ]
    seed = tf.constant([3, 4], tf.int64)
    lit = data.pca_lighting(image, seed).numpy()
    alpha = tf.random.stateless_normal([3], seed, stddev=0.1).numpy()
    offset = [sum(eigvec[c][j] * alpha[j] * eigval[j] for j in range(3)) for c in range(3)]
    np.testing.assert_allclose(lit - image.numpy(), np.broadcast_to(offset, lit.shape), atol=1e-6)
    assert np.abs(offset).max() > 1e-4


def test_options_change_the_training_images():
    with tfds.testing.mock_data(num_examples=4):
        plain = batches(data.imagenet_train_dataset(None, 4, 0, 0, 1)[0])
        jitter = batches(data.imagenet_train_dataset(None, 4, 0, 0, 1, color_jitter=True)[0])
        light = batches(data.imagenet_train_dataset(None, 4, 0, 0, 1, lighting=True)[0])
    np.testing.assert_array_equal(plain[0][1], jitter[0][1])  # same order
    assert not np.allclose(plain[0][0], jitter[0][0])
    assert not np.allclose(plain[0][0], light[0][0])


RSS_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    import tensorflow as tf
    import tensorflow_datasets as tfds
    from reste_larq import data

    buffer, n, side = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(0)
    # Photo-like JPEGs: smooth gradients plus noise, ~ImageNet's mean size.
    jpegs = []
    for k in range(8):
        yy, xx = np.mgrid[0:side, 0:side * 4 // 3]
        base = (np.sin(xx / (7 + k)) + np.cos(yy / 11)) * 60 + 128
        img = base[..., None] + rng.normal(0, 22, (side, side * 4 // 3, 3))
        jpegs.append(tf.io.encode_jpeg(np.clip(img, 0, 255).astype(np.uint8), quality=90))
    jpegs = tf.stack(jpegs)

    def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
        # Distinct string tensors per example (as TFDS yields them from its records).
        return tf.data.Dataset.range(n).map(
            lambda i: {"image": tf.strings.join([jpegs[i % 8], ""]), "label": i % 1000}
        ).apply(tf.data.experimental.assert_cardinality(n))

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        ds, _ = data.imagenet_train_dataset(None, 8, 0, 0, 1, shuffle_buffer=buffer)
        it = iter(ds)
        for _ in range(6):
            next(it)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak": peak, "jpeg": float(np.mean([len(j) for j in jpegs.numpy()]))}))
    """
)


def peak_rss(buffer, n, side):
    out = subprocess.run(
        [sys.executable, "-c", RSS_CHILD, str(buffer), str(n), str(side)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_shuffle_buffer_holds_compressed_images_not_decoded_ones():
    """Peak RSS of the train pipeline with a 64- and a 1,600-example shuffle buffer of
    375x500 photo-like JPEGs: the growth per buffered example is about a JPEG's size,
    far below a decoded image's 562 KB (decoding before shuffling would cost that)."""
    side, small, large = 375, 64, 1600
    a = peak_rss(small, large + 200, side)
    b = peak_rss(large, large + 200, side)
    per_example = (b["peak"] - a["peak"]) / (large - small)
    decoded = side * (side * 4 // 3) * 3
    assert 20_000 < b["jpeg"] < 0.4 * decoded  # the JPEGs are realistic and compressed
    assert per_example < 2.5 * b["jpeg"] and per_example < 0.5 * decoded, (per_example, b)


def test_two_workers_split_each_epoch_into_the_single_device_batches():
    """Sharded by worker before decoding: across the workers, step k holds the images
    of one device's batch k (same crops: seeded by global position), each image on one
    worker only; the epoch is cut to whole global batches (10 images, batch 4: 2 steps)."""
    with tfds.testing.mock_data(num_examples=10):
        single, single_steps = data.imagenet_train_dataset(None, 4, seed=5, first_epoch=0, epochs=2)
        single = batches(single)
        workers = []
        for i in range(2):
            context = tf.distribute.InputContext(2, i, 2)
            ds, steps = data.imagenet_train_dataset(
                None, 4, seed=5, first_epoch=0, epochs=2, input_context=context
            )
            workers.append(batches(ds))
            assert steps == 2 and single_steps == 3
    assert [len(w) for w in workers] == [4, 4]  # 2 epochs x 2 steps, 2 images each
    for epoch in range(2):
        for k in range(2):
            mine = np.concatenate([w[epoch * 2 + k][0] for w in workers])
            one_device = single[epoch * 3 + k][0]
            assert mine.shape == one_device.shape == (4, 224, 224, 3)
            # the same four images (each worker's in its own order within the step)
            as_set = sorted(x.tobytes() for x in mine)
            assert as_set == sorted(x.tobytes() for x in one_device)


def test_a_batch_the_replicas_cannot_split_is_a_clear_error():
    with tfds.testing.mock_data(num_examples=10):
        with pytest.raises(ConfigError, match="batch size 5 is not a multiple of the 2 replicas"):
            data.imagenet_train_dataset(
                None,
                5,
                seed=5,
                first_epoch=0,
                epochs=1,
                input_context=tf.distribute.InputContext(2, 0, 2),
            )
        with pytest.raises(ConfigError, match="10 training images make no whole batch of 12"):
            data.imagenet_train_dataset(
                None,
                12,
                seed=5,
                first_epoch=0,
                epochs=1,
                input_context=tf.distribute.InputContext(2, 0, 2),
            )
