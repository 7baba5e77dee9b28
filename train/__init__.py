"""The command lines: `python -m train.cifar`, `train.imagenet`, `train.multistage`."""

# First: it imports TensorFlow with Keras 2 as tf.keras, before any CLI module does.
import reste_larq  # noqa: F401
