"""Recipe pieces a library user needs as much as the CLI: PyTorch's SGD (momentum form
and coupled weight decay), Adam with coupled weight decay, and the loss.

PyTorch's `torch.optim.SGD(lr, momentum, weight_decay)`, which the ReSTE reference
trains with, does per step (dampening 0, no Nesterov):

    g = dL/dw + wd * w          (coupled L2: every parameter, BatchNorm's too)
    b = momentum * b + g        (b = g at the first step)
    w = w - lr * b

Keras' SGD keeps v = momentum * v - lr * g instead. The two agree while lr is constant
but not when it changes (a warm-up, a per-epoch cosine): Keras' velocity carries the
old rates, PyTorch's buffer does not. Keras' own `weight_decay` is decoupled
(w -= lr * wd * w after the step), which is neither.

```python
from reste_larq.training import TorchSGD, sparse_cross_entropy

model.compile(TorchSGD(0.1, momentum=0.9, coupled_weight_decay=1e-4),
              sparse_cross_entropy(10), ["accuracy"])
```
"""

from __future__ import annotations

import gc

import tensorflow as tf

from reste_larq.errors import ConfigError

OPTIMIZERS = ("sgd", "adam")


def _check_decay(coupled_weight_decay):
    if not coupled_weight_decay >= 0:  # also rejects NaN
        raise ConfigError(f"coupled_weight_decay must be >= 0 (got {coupled_weight_decay})")
    return float(coupled_weight_decay)


def _with_coupled_decay(gradient, variable, coupled_weight_decay):
    """dL/dw + wd * w, as PyTorch's `weight_decay` adds it before momentum/moments.

    Applied in `update_step`, which runs once per variable after the replicas'
    gradients are summed, so it is added once whatever the distribution strategy."""
    if isinstance(gradient, tf.IndexedSlices):
        gradient = tf.convert_to_tensor(gradient)
    if coupled_weight_decay:
        gradient = gradient + tf.cast(coupled_weight_decay, variable.dtype) * variable
    return gradient


@tf.keras.utils.register_keras_serializable(package="reste_larq")
class TorchSGD(tf.keras.optimizers.SGD):
    r"""SGD with PyTorch's momentum form and coupled weight decay (see module docs).

    \\(g_t = \nabla L(w_t) + \lambda w_t,\ b_t = \mu b_{t-1} + g_t,\
    w_{t+1} = w_t - \eta_t b_t\\)

    Args:
        learning_rate: \\(\eta\\).
        momentum: \\(\mu\\) (0 gives plain SGD).
        coupled_weight_decay: \\(\lambda\\), added to the gradient of every variable the
            optimizer updates (PyTorch SGD's `weight_decay`).
    """

    def __init__(
        self, learning_rate=0.1, momentum=0.9, coupled_weight_decay=0.0, name="TorchSGD", **kwargs
    ):
        if kwargs.get("nesterov"):
            raise ConfigError(
                "TorchSGD implements PyTorch's plain momentum; nesterov is not offered"
            )
        if kwargs.get("weight_decay"):
            raise ConfigError(
                "TorchSGD: use coupled_weight_decay (PyTorch's); Keras' weight_decay is decoupled"
            )
        kwargs.pop("nesterov", None)
        kwargs.pop("weight_decay", None)
        super().__init__(learning_rate=learning_rate, momentum=momentum, name=name, **kwargs)
        self.coupled_weight_decay = _check_decay(coupled_weight_decay)

    def update_step(self, gradient, variable):
        lr = tf.cast(self.learning_rate, variable.dtype)
        momentum = tf.cast(self.momentum, variable.dtype)
        gradient = _with_coupled_decay(gradient, variable, self.coupled_weight_decay)
        buffer = self.momentums[self._index_dict[self._var_key(variable)]]
        # Zero-initialized, so the first step gives b = g, as PyTorch's lazy buffer.
        buffer.assign(momentum * buffer + gradient)
        variable.assign_sub(lr * buffer)

    def get_config(self):
        config = super().get_config()
        config.pop("nesterov", None)
        return {**config, "coupled_weight_decay": self.coupled_weight_decay}


@tf.keras.utils.register_keras_serializable(package="reste_larq")
class CoupledAdam(tf.keras.optimizers.Adam):
    r"""Keras' Adam with PyTorch's coupled `weight_decay`: \\(\lambda w\\) joins the
    gradient before the moments (not AdamW's decoupled decay)."""

    def __init__(self, learning_rate=1e-3, coupled_weight_decay=0.0, name="CoupledAdam", **kwargs):
        if kwargs.get("weight_decay"):
            raise ConfigError(
                "CoupledAdam: use coupled_weight_decay; for decoupled decay "
                "use tf.keras.optimizers.AdamW"
            )
        kwargs.pop("weight_decay", None)
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.coupled_weight_decay = _check_decay(coupled_weight_decay)

    def update_step(self, gradient, variable):
        super().update_step(
            _with_coupled_decay(gradient, variable, self.coupled_weight_decay), variable
        )

    def get_config(self):
        return {**super().get_config(), "coupled_weight_decay": self.coupled_weight_decay}


def make_optimizer(
    name: str, learning_rate: float, *, momentum: float = 0.9, coupled_weight_decay: float = 0.0
) -> tf.keras.optimizers.Optimizer:
    """ "sgd" (`TorchSGD`, the ReSTE recipe) or "adam" (`CoupledAdam`, Bi-Real/BNN-tricks)."""
    if name == "sgd":
        return TorchSGD(learning_rate, momentum, coupled_weight_decay)
    if name == "adam":
        return CoupledAdam(learning_rate, coupled_weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def _is_soft(labels, num_classes: int) -> bool:
    """Soft (mixup) labels are float [batch, num_classes]; integer labels are [batch]
    or [batch, 1] (of any dtype: Keras' metric wrappers cast them to float)."""
    return labels.shape.rank == 2 and labels.shape[-1] == num_classes and num_classes > 1


@tf.keras.utils.register_keras_serializable(package="reste_larq")
class CrossEntropy(tf.keras.losses.Loss):
    """Cross-entropy on logits and integer labels, or soft labels (one row of class
    probabilities per example, as mixup makes them); with label smoothing ε the target
    is (1 − ε)·target + ε/K (Keras' and PyTorch's definition). A Keras `Loss`: the
    per-example values are reduced by Keras (also under tf.distribute)."""

    def __init__(self, num_classes: int, label_smoothing: float = 0.0, **kwargs):
        super().__init__(name=kwargs.pop("name", "cross_entropy"), **kwargs)
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1) (got {label_smoothing})")
        self.num_classes = int(num_classes)
        self.label_smoothing = float(label_smoothing)

    def call(self, labels, logits):
        labels = tf.convert_to_tensor(labels)
        if _is_soft(labels, self.num_classes):
            targets = tf.cast(labels, logits.dtype)
        elif not self.label_smoothing:
            return tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        else:
            labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
            targets = tf.one_hot(labels, self.num_classes, dtype=logits.dtype)
        return tf.keras.losses.categorical_crossentropy(
            targets, logits, from_logits=True, label_smoothing=self.label_smoothing
        )

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "label_smoothing": self.label_smoothing,
        }


def sparse_cross_entropy(num_classes: int, label_smoothing: float = 0.0) -> CrossEntropy:
    """The training loss: `CrossEntropy(num_classes, label_smoothing)`."""
    return CrossEntropy(num_classes, label_smoothing)


def top_k_accuracy(num_classes: int, k: int = 1, name: str | None = None):
    """Top-k accuracy for integer labels and for soft labels (against their most
    probable class): the metrics of a run whose training batches are mixed up."""

    def accuracy(labels, logits):
        if _is_soft(labels, num_classes):
            labels = tf.argmax(labels, axis=-1)
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        return tf.cast(tf.math.in_top_k(labels, tf.cast(logits, tf.float32), k), tf.float32)

    return tf.keras.metrics.MeanMetricWrapper(accuracy, name=name or f"top{k}")


def restore_weights(model, checkpoint_path, *, distilled=False):
    """Restore every weight of `model` from a TF checkpoint of a run, or stop.

    The checkpoint is matched by object graph (`tf.train.Checkpoint(model=...)`, as the
    training CLIs write it; `distilled`: it holds a `Distiller`, the student under
    model/student), so a 1W32A run's weights load into its 1W1A twin: the twin's
    activation quantizers hold only estimator state (o, mu), which is not in
    `model.weights` and may be missing. Every weight must come from the checkpoint: a
    TF restore alone passes when one variable matched, and a model whose shapes happen
    to line up would train mostly from its random initialization.

    Raises `ConfigError` naming the weights that are missing from the checkpoint (or
    not finite in it) or whose shapes differ.

    ```python
    twin = models.build("resnet20_1w1a")   # uncompiled: no optimizer slots to restore
    restore_weights(twin, tf.train.latest_checkpoint("results/stage1/checkpoint"))
    student.set_weights(twin.get_weights())
    ```
    """
    weights = [w for w in model.weights if w.dtype.is_floating]
    for w in weights:  # a weight the restore does not reach stays NaN
        w.assign(tf.fill(w.shape, tf.constant(float("nan"), w.dtype)))
    saved = tf.train.Checkpoint(student=model) if distilled else model
    detail = None
    logger = tf.get_logger()
    level = logger.level
    # A restore that fails midway leaves a half-read checkpoint whose deletion logs one
    # warning per unread value (dozens): the error below says what is wrong.
    logger.setLevel("ERROR")
    try:
        try:
            tf.train.Checkpoint(model=saved).restore(checkpoint_path).expect_partial()
        except ValueError as error:  # TensorFlow names the variable whose shape differs
            detail = str(error).strip().splitlines()[0]
        gc.collect()  # the half-read checkpoint, while the logger is quiet
    finally:
        logger.setLevel(level)
    if detail is not None:
        raise ConfigError(f"{checkpoint_path} holds a model of another architecture: {detail}")
    missing = [w.name for w in weights if not tf.reduce_all(tf.math.is_finite(w))]
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        raise ConfigError(
            f"{checkpoint_path} does not hold {len(missing)} of the model's "
            f"{len(weights)} weights (missing, or not finite there): {shown}"
        )
