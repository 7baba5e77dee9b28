"""Deployment: LCE conversion, op counting, and TFLite evaluation with LCE's interpreter.

```python
from reste_larq import export
flatbuffer = export.convert(model)
export.op_counts(flatbuffer)["LceBconv2d"] == export.count_binary_convs(model)
```

On x86 LCE's interpreter runs reference kernels: outputs are exact, latency is not
representative of ARM devices.
"""

from __future__ import annotations

import collections
import logging
import os
import warnings

import larq as lq
import numpy as np
import tensorflow as tf

from reste_larq.errors import ConfigError

_BUILTIN_NAMES = None


def _float32_config(config):
    """A model config with every layer's dtype policy replaced by float32."""
    if isinstance(config, dict):
        return {
            key: "float32" if key == "dtype" else _float32_config(value)
            for key, value in config.items()
        }
    if isinstance(config, list):
        return [_float32_config(value) for value in config]
    return config


def is_mixed_precision(model: tf.keras.Model) -> bool:
    return any(layer.dtype_policy.compute_dtype != "float32" for layer in [model, *model.layers])


def float32_twin(model: tf.keras.Model) -> tf.keras.Model:
    """The same model computing in float32, with the same weights (mixed-precision
    models keep float32 variables, so nothing is rounded). The deployed form: LCE
    converts float32 graphs."""
    # The model object takes the global policy when made: float32 while building it.
    policy = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy("float32")
    try:
        twin = tf.keras.Model.from_config(_float32_config(model.get_config()))
    finally:
        tf.keras.mixed_precision.set_global_policy(policy)
    twin.set_weights(model.get_weights())
    return twin


def convert(model: tf.keras.Model) -> bytes:
    """Convert with Larq Compute Engine (binary convs become LceBconv2d). A
    mixed-precision model is converted as its `float32_twin`."""
    import larq_compute_engine as lce

    if is_mixed_precision(model):
        model = float32_twin(model)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = tf.get_logger().level
        tf.get_logger().setLevel(logging.ERROR)
        try:
            return lce.convert_keras_model(model)
        finally:
            tf.get_logger().setLevel(previous)


def convert_float(model: tf.keras.Model) -> bytes:
    """Convert with the stock TFLite converter (for float baselines)."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    return converter.convert()


def op_counts(flatbuffer: bytes) -> collections.Counter:
    """Operator name -> count over the main subgraph ('CONV_2D', 'LceBconv2d', ...)."""
    from tensorflow.lite.python import schema_py_generated as schema

    global _BUILTIN_NAMES
    if _BUILTIN_NAMES is None:
        ops = schema.BuiltinOperator
        _BUILTIN_NAMES = {v: k for k, v in vars(ops).items() if not k.startswith("_")}
    model = schema.Model.GetRootAsModel(flatbuffer, 0)
    graph = model.Subgraphs(0)
    counts = collections.Counter()
    for i in range(graph.OperatorsLength()):
        code = model.OperatorCodes(graph.Operators(i).OpcodeIndex())
        custom = code.CustomCode()
        if custom:
            counts[custom.decode()] += 1
        else:
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            counts[_BUILTIN_NAMES.get(builtin, str(builtin))] += 1
    return counts


def _is_binary(quantizer) -> bool:
    return getattr(quantizer, "precision", None) == 1


def count_binary_convs(model: tf.keras.Model) -> int:
    """QuantConv2D layers with binary inputs *and* kernels: each must become LceBconv2d."""
    return sum(
        1
        for layer in model.submodules
        if isinstance(layer, lq.layers.QuantConv2D)
        and _is_binary(layer.input_quantizer)
        and _is_binary(layer.kernel_quantizer)
    )


def interpreter(flatbuffer: bytes, num_threads: int = 1):
    import larq_compute_engine as lce

    return lce.testing.Interpreter(flatbuffer, num_threads=num_threads)


def predict_tflite(flatbuffer: bytes, images: np.ndarray, num_threads: int = 1) -> np.ndarray:
    """Logits of the converted model, one image at a time (LCE's interpreter is batch 1)."""
    images = np.asarray(images, dtype=np.float32)
    if len(images) == 0:
        raise ConfigError("no images to predict")
    return np.asarray(interpreter(flatbuffer, num_threads).predict(images))


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Top-k accuracy in percent."""
    labels = np.asarray(labels).reshape(-1)
    k = min(k, logits.shape[-1])
    topk = np.argsort(-logits, axis=-1)[:, :k]
    return float(100.0 * np.mean(np.any(topk == labels[:, None], axis=-1)))


def evaluate_tflite(flatbuffer: bytes, dataset: tf.data.Dataset, num_threads: int = 1):
    """(top1, top5) in percent of the converted model over a batched (image, label)
    dataset, with LCE's interpreter."""
    it = interpreter(flatbuffer, num_threads)
    all_logits, all_labels = [], []
    for images, labels in dataset.as_numpy_iterator():
        all_logits.append(np.asarray(it.predict(images.astype(np.float32))))
        all_labels.append(labels)
    if not all_logits:
        raise ConfigError("the evaluation dataset is empty")
    logits = np.concatenate(all_logits).reshape(-1, all_logits[0].shape[-1])
    labels = np.concatenate(all_labels)
    return topk_accuracy(logits, labels, 1), topk_accuracy(logits, labels, 5)


def write_atomic(path: str, data: bytes | str):
    """Write via a temporary file and rename, so a killed run leaves no half file."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    os.replace(tmp, path)
