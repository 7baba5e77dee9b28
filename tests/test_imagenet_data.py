"""ImageNet's pipeline on TFDS mock data: decoded after the shuffle (memory bounded by
compressed bytes), epoch order and augmentation a function of (seed, epoch), the
evaluation crop, and the optional colour jitter and PCA lighting."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from reste_larq import data

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


def test_train_crop_decodes_only_a_window_and_flips():
    """The random-resized crop against a hand computation on one JPEG."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    encoded = tf.io.encode_jpeg(image, quality=100)
    seed = tf.constant([5, 9], tf.int64)
    out = data._imagenet_train_image(encoded, seed, jitter=False, lighting=False).numpy()
    seeds = tf.random.experimental.stateless_split(seed, 4)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        [60, 80, 3],
        tf.zeros([1, 0, 4]),
        seed=seeds[0],
        area_range=(0.08, 1.0),
        aspect_ratio_range=(3 / 4, 4 / 3),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    decoded = tf.io.decode_jpeg(encoded, channels=3)
    crop = decoded[begin[0] : begin[0] + size[0], begin[1] : begin[1] + size[1]]
    expected = tf.image.resize(crop, (224, 224)).numpy() / 255.0
    flipped = expected[:, ::-1]
    assert out.shape == (224, 224, 3)
    # decode_and_crop may differ from decode-then-crop by JPEG's rounding only
    best = min(np.abs(out - expected).mean(), np.abs(out - flipped).mean())
    assert best < 0.01


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
    # Lighting adds one RGB offset to every pixel: eigvec @ (alpha * eigval)
    seed = tf.constant([3, 4], tf.int64)
    lit = data.pca_lighting(image, seed).numpy()
    alpha = tf.random.stateless_normal([3], seed, stddev=0.1).numpy()
    offset = np.array(data.IMAGENET_EIGVEC) @ (alpha * np.array(data.IMAGENET_EIGVAL))
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
