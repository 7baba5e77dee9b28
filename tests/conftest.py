# First: it imports TensorFlow with Keras 2 as tf.keras, and registers the quantizer names.
import reste_larq  # noqa: F401

# isort: split
import gc
import logging
import os

import pytest
import tensorflow as tf

# mixed_precision="auto" (the default) would train in bfloat16 on a CPU with AVX-512
# BF16, such as this project's CI machine: the suite trains in float32 on every machine
# (its golden digests and TFLite = Keras bounds are float32's), set here before any test
# process or CLI subprocess starts. The auto tests (test_experiment.py) set it themselves.
os.environ["RESTE_LARQ_CPU_BF16"] = "0"

# Larq warns on every binary conv without a kernel constraint (the reference uses none).
logging.getLogger("larq").setLevel(logging.ERROR)


# A full gc.collect() walks TensorFlow's whole heap: ~0.25 s even when nothing is freed,
# a minute and a half over the default suite. Collect when the process has grown by
# 1 GiB since the last collection (resident memory seldom shrinks, so not "above N").
_COLLECT_AFTER_GROWTH = 2**30
_PAGE = os.sysconf("SC_PAGE_SIZE")
_collected_at = [0]


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


@pytest.fixture(autouse=True)
def _seed_policy_and_memory():
    tf.keras.utils.set_random_seed(0)
    yield
    tf.keras.mixed_precision.set_global_policy("float32")
    # Keras keeps every model's graphs alive otherwise: the slow suite builds 144
    # models in one process and grew past 23 GB (OOM-killed) without this.
    tf.keras.backend.clear_session()
    if _resident_bytes() - _collected_at[0] > _COLLECT_AFTER_GROWTH:
        gc.collect()
        _collected_at[0] = _resident_bytes()


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    """The official CIFAR-10 python folder layout, 80 train and 16 test images."""
    from tests.test_data import write_cifar10

    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(str(root), n_per_batch=16)
    return str(root)


# The end-to-end CLI runs first: with two test processes, long tests that start last
# leave one process idle while the other finishes them.
_FIRST = ("tests/test_train.py", "tests/test_multistage.py", "tests/test_distill.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: not item.nodeid.startswith(_FIRST))
