# First: it imports TensorFlow with Keras 2 as tf.keras, and registers the quantizer names.
import reste_larq  # noqa: F401

# isort: split
import gc
import logging

import pytest
import tensorflow as tf

# Larq warns on every binary conv without a kernel constraint (the reference uses none).
logging.getLogger("larq").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def _seed_policy_and_memory():
    tf.keras.utils.set_random_seed(0)
    yield
    tf.keras.mixed_precision.set_global_policy("float32")
    # Keras keeps every model's graphs alive otherwise: the slow suite builds 144
    # models in one process and grew past 23 GB (OOM-killed) without this.
    tf.keras.backend.clear_session()
    gc.collect()


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    """The official CIFAR-10 python folder layout, 80 train and 16 test images."""
    from tests.test_data import write_cifar10

    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(str(root), n_per_batch=16)
    return str(root)
