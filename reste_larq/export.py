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
import contextlib
import os
import sys
import tempfile
import time

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
    """Convert with Larq Compute Engine: every binary conv becomes LceBconv2d, or a
    `ConfigError` says how many did not (a quantizer LCE does not recognize as a sign).
    A mixed-precision model is converted as its `float32_twin`.

    A model with Keras inputs (functional or sequential) is saved as a SavedModel
    holding one inference signature, ``model(x, training=False)``, and its variables,
    then converted with `lce.convert_saved_model`. That is what
    `lce.convert_keras_model` converts, less the Keras SavedModel's traces of every
    layer's call in both training modes: about 3x faster here (ResNet-20: 7 s against
    21 s), with the same flatbuffer byte for byte (the signature keeps Keras' input and
    output names). Other models go through `lce.convert_keras_model`."""
    import larq_compute_engine as lce

    if is_mixed_precision(model):
        model = float32_twin(model)
    if getattr(model, "_is_graph_network", False) or isinstance(model, tf.keras.Sequential):
        with tempfile.TemporaryDirectory() as directory:
            _save_inference_signature(model, directory)
            flatbuffer = lce.convert_saved_model(directory)
    else:
        flatbuffer = lce.convert_keras_model(model)
    expected, found = count_binary_convs(model), op_counts(flatbuffer).get("LceBconv2d", 0)
    if found != expected:
        raise ConfigError(
            f"LCE converted {found} of the model's {expected} binary convs to LceBconv2d: "
            "a binary conv whose quantizers LCE does not read as a sign runs as a float "
            "conv (see docs/models.md)"
        )
    return flatbuffer


def _save_inference_signature(model: tf.keras.Model, directory: str):
    """A SavedModel with one serving signature, ``model(x, training=False)``, named as
    Keras names it (inputs by their Input layers, outputs by their layers), and only the
    variables that signature reads."""
    specs = [
        tf.TensorSpec(tensor.shape, tensor.dtype, name=name)
        for tensor, name in zip(model.inputs, model.input_names)
    ]

    def serve(*inputs):
        outputs = model(list(inputs) if len(inputs) > 1 else inputs[0], training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        return dict(zip(model.output_names, outputs))

    module = tf.Module()
    module.serve = tf.function(serve, input_signature=specs)
    # Tracked, so that the SavedModel stores them (quantizers' o and mu included).
    module.captured_variables = list(module.serve.get_concrete_function().variables)
    tf.saved_model.save(module, directory, signatures=module.serve)


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


def count_binary_kernels(model: tf.keras.Model) -> int:
    """Layers with a 1-bit kernel quantizer (binary convs and 1W32A convs alike)."""
    return sum(
        1
        for layer in model.submodules
        if _is_binary(getattr(layer, "kernel_quantizer", None)) and hasattr(layer, "kernel")
    )


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


def tflite_predictions(
    flatbuffer: bytes,
    dataset: tf.data.Dataset,
    num_threads: int | None = None,
    limit: int | None = None,
    progress: bool = False,
):
    """(logits, labels) of the converted model over a batched (image, label) dataset,
    with LCE's interpreter on `num_threads` threads (default 1), for the
    first `limit` images (default: all). `progress`: a Keras progress bar with the
    images done and images/s, on stderr (stdout stays the caller's: the CLI's metrics
    JSON)."""
    # One thread by default: on an idle 2-core machine two were no faster (260.6 against
    # 254.9 img/s), and beside other busy processes one was 4.4x faster (80.2 against
    # 18.4; TFLite's worker threads spin while they wait, the likely cause)
    # (benchmarks/tflite_eval.py; docs/results.md).
    it = interpreter(flatbuffer, num_threads or 1)
    if limit:
        dataset = dataset.unbatch().take(limit).batch(64)
    batches = int(dataset.cardinality())
    bar = None
    all_logits, all_labels = [], []
    done, started = 0, time.perf_counter()
    for step, (images, labels) in enumerate(dataset.as_numpy_iterator(), 1):
        all_logits.append(np.asarray(it.predict(images.astype(np.float32))))
        all_labels.append(labels)
        done += len(labels)
        if progress:
            if bar is None:  # images: batches x the first batch's size, exact at the end
                target = batches * len(labels) if batches > 0 else None
                with contextlib.redirect_stdout(sys.stderr):  # its isatty() decides the look
                    bar = tf.keras.utils.Progbar(
                        target, unit_name="image", stateful_metrics=["images/s"]
                    )
            last = step == batches
            if last:
                bar.target = done
            rate = done / max(time.perf_counter() - started, 1e-9)
            with contextlib.redirect_stdout(sys.stderr):  # Keras' Progbar writes to stdout
                bar.update(done, [("images/s", rate)], finalize=last)
    if not all_logits:
        raise ConfigError("the evaluation dataset is empty")
    logits = np.concatenate(all_logits).reshape(-1, all_logits[0].shape[-1])
    return logits, np.concatenate(all_labels)


def evaluate_tflite(
    flatbuffer: bytes,
    dataset: tf.data.Dataset,
    num_threads: int | None = None,
    limit: int | None = None,
):
    """(top1, top5) in percent of the converted model (see `tflite_predictions`)."""
    logits, labels = tflite_predictions(flatbuffer, dataset, num_threads, limit)
    return topk_accuracy(logits, labels, 1), topk_accuracy(logits, labels, 5)


def write_atomic(path: str, data: bytes | str):
    """Write via a temporary file and rename, so a killed run leaves no half file."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    os.replace(tmp, path)


# ----------------------------------------------------------- packed 1-bit checkpoints
_PACKED_FORMAT = "reste_larq.packed.v1"


def _binary_kernel_layers(model):
    """id(latent kernel variable) -> layer, for layers whose kernel quantizer is 1-bit."""
    found = {}
    for layer in model.submodules:
        kernel = getattr(layer, "kernel", None)
        if _is_binary(getattr(layer, "kernel_quantizer", None)) and kernel is not None:
            found[id(getattr(kernel, "latent_variable", kernel))] = layer
    return found


def _deployed_kernel(layer, latent):
    """What the layer computes with at inference: its kernel quantizer on `latent`
    (Keras passes `training` on only to quantizers whose call takes it, as BNN++'s)."""
    return np.asarray(layer.kernel_quantizer(tf.constant(latent), training=False))


def save_packed(model: tf.keras.Model, path: str) -> dict:
    """Write `model` with every binary kernel as 1 bit per weight (`np.packbits` of the
    signs its quantizer deploys) plus one float32 scale per output channel, and every
    other weight as it is, with the model's config (McDonnell's packed checkpoint).

    The file restores the model's inference outputs exactly (`load_packed`); the latent
    real-valued kernels are not kept, so it is a deployment checkpoint, not a training
    one. For 1W32A models, which LCE cannot shrink, it is the small portable file.
    A per-channel scale that no float32 latent reproduces exactly (a mean over N
    values can skip a float32 when N is not a power of two) keeps that kernel as float32:
    `unpacked_binary_kernels` counts them (0 for MeanAbsScaled and McDonnell's scaling
    on the zoo's models; Bi-Real Net's magnitude-aware sign loses a few).
    Returns {"binary_kernels", "unpacked_binary_kernels", "packed_bytes", "float_bytes"}.

    ```python
    export.save_packed(model, "wrn.packed.npz")
    same = export.load_packed("wrn.packed.npz")   # or load_packed(path, model=built)
    ```
    """
    binary = _binary_kernel_layers(model)
    arrays = {
        "format": np.array(_PACKED_FORMAT),
        "config": np.array(model.to_json()),
    }
    stats = {"binary_kernels": 0, "unpacked_binary_kernels": 0, "packed_bytes": 0, "float_bytes": 0}
    for i, weight in enumerate(model.weights):
        value = weight.numpy()  # a QuantizedVariable reads as its latent value
        layer = binary.get(id(getattr(weight, "latent_variable", weight)))
        if layer is not None:
            deployed = _deployed_kernel(layer, value).reshape(-1, value.shape[-1])
            scale = np.abs(deployed).max(axis=0).astype(np.float32)
            signs = deployed.ravel() >= 0
            if np.array_equal(
                np.abs(deployed), np.broadcast_to(scale, deployed.shape)
            ) and _restorable(layer, value.shape, signs, scale):
                arrays[f"bits{i}"] = np.packbits(signs)
                arrays[f"scale{i}"] = scale
                stats["binary_kernels"] += 1
                stats["packed_bytes"] += arrays[f"bits{i}"].nbytes + scale.nbytes
                continue
            stats["unpacked_binary_kernels"] += 1
        arrays[f"w{i}"] = value
        stats["float_bytes"] += value.nbytes
    with open(path, "wb") as f:  # np.savez would append .npz to a path without it
        np.savez_compressed(f, **arrays)
    return stats


def _restorable(layer, shape, signs, scale) -> bool:
    try:
        _latent_deploying(layer, shape, signs, scale)
    except ConfigError:
        return False
    return True


def _latent_deploying(layer, shape, signs, scale):
    """A latent kernel whose deployed form is exactly signs * scale.

    Scaled quantizers recompute their scale from the latent (mean |w| over the kernel
    or per output channel), and a float32 mean of N copies of s is not always s (here
    up to a few ulps off). So each scale group (the whole kernel when every channel has
    the same scale, else each channel) gets a magnitude a with mean(a) <= s <=
    mean(next float after a), then its first k entries raised to that next float, with
    k found by bisection, until the quantizer gives back the stored scale to the bit."""
    scalar = bool(np.all(scale == scale[0]))
    groups = 1 if scalar else shape[-1]
    target = (scale[:1] if scalar else scale).astype(np.float32)
    signs = signs.reshape(-1, groups)
    rows = signs.shape[0]
    up = np.float32(np.inf)

    def deployed_scale(low, k):
        high = np.nextafter(low, up)
        first = np.arange(rows)[:, None] < k[None, :]
        magnitudes = np.where(first, high, low).astype(np.float32)
        latent = np.where(signs, magnitudes, -magnitudes).reshape(shape).astype(np.float32)
        got = np.abs(_deployed_kernel(layer, latent).reshape(-1, shape[-1])).max(axis=0)
        return latent, (got[:1] if scalar else got)

    none, every = np.zeros(groups, np.int64), np.full(groups, rows, np.int64)
    base = target.copy()
    for _ in range(64):  # bracket: mean(base) <= target <= mean(next(base))
        latent, got_low = deployed_scale(base, none)
        if np.array_equal(got_low, target):
            return latent
        _, got_high = deployed_scale(base, every)
        below, above = got_low > target, got_high < target
        if not (below.any() or above.any()):
            break
        base = np.where(below, np.nextafter(base, -up), base)
        base = np.where(above, np.nextafter(base, up), base).astype(np.float32)
    low, high = none.copy(), every.copy()
    for _ in range(int(np.log2(rows)) + 2):  # bisection on k per group
        k = (low + high) // 2
        latent, got = deployed_scale(base, k)
        if np.array_equal(got, target):
            return latent
        low = np.where(got < target, k + 1, low)
        high = np.where(got > target, k, high)
        low = np.where(got == target, k, low)
        high = np.where(got == target, k, high)
    # Rounding inside the mean is not quite monotonic in k: look around the bisection's k.
    found = np.zeros(groups, bool)
    best = low.copy()
    for offset in range(-16, 17):
        k = np.clip(low + offset, 0, rows)
        _, got = deployed_scale(base, np.where(found, best, k))
        hit = (got == target) & ~found
        best, found = np.where(hit, k, best), found | hit
        if found.all():
            return deployed_scale(base, best)[0]
    raise ConfigError(f"{layer.name}: could not restore its binary kernel's scale exactly")


def load_packed(path: str, model: tf.keras.Model | None = None) -> tf.keras.Model:
    """Restore a `save_packed` file: into `model` (an architecture-identical model you
    built) or, without one, into a model rebuilt from the stored config."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path} is not a packed checkpoint ({error})") from None
    if str(arrays.get("format")) != _PACKED_FORMAT:
        raise ConfigError(f"{path} is not a {_PACKED_FORMAT} file (see export.save_packed)")
    if model is None:
        model = tf.keras.models.model_from_json(str(arrays["config"]))
    binary = _binary_kernel_layers(model)
    weights = model.weights
    stored = sum(1 for k in arrays if k.startswith(("w", "bits")))
    if stored != len(weights):
        raise ConfigError(
            f"{path} holds {stored} weights, the model has {len(weights)}: another architecture"
        )
    for i, weight in enumerate(weights):
        if f"bits{i}" in arrays:
            layer = binary.get(id(getattr(weight, "latent_variable", weight)))
            if layer is None:
                raise ConfigError(f"{path}: weight {i} ({weight.name}) is not a binary kernel here")
            size = int(np.prod(weight.shape))
            signs = np.unpackbits(arrays[f"bits{i}"], count=size).astype(bool)
            weight.assign(_latent_deploying(layer, weight.shape, signs, arrays[f"scale{i}"]))
        else:
            value = arrays[f"w{i}"]
            if tuple(value.shape) != tuple(weight.shape):
                raise ConfigError(
                    f"{path}: weight {i} ({weight.name}) is {value.shape}, the model has "
                    f"{tuple(weight.shape)}: another architecture"
                )
            weight.assign(value)
    return model
