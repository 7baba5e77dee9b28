import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import logging  # noqa: E402

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import reste_larq  # noqa: E402,F401  (registers the quantizer names)

# Larq warns on every binary conv without a kernel constraint (the reference uses none).
logging.getLogger("larq").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def _seed_and_policy():
    tf.keras.utils.set_random_seed(0)
    yield
    tf.keras.mixed_precision.set_global_policy("float32")
