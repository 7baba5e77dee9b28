# First: it imports TensorFlow with Keras 2 as tf.keras (benchmarks import tests' helpers).
import reste_larq  # noqa: F401
