"""Keras callbacks for BNN training: estimator schedules, the learning-rate recipe of
the ReSTE reference, and ReSTE's two indicators.

All schedules are functions of the epoch index only, so a run resumed with
`model.fit(..., initial_epoch=k)` sees exactly the values an uninterrupted run sees.

```python
model.fit(
    data,
    epochs=E,
    callbacks=[
        EstimatorSchedule(E, o_end=3.0),
        LearningRateSchedule(0.1, E, warmup_epochs=5),
    ],
)
```
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import tensorflow as tf

from reste_larq.distill import Distiller
from reste_larq.errors import ConfigError
from reste_larq.quantizers import (
    BNNpp,
    MeanAbsScaled,
    ReCU,
    ReSTE,
    recu_tau_at,
    reste_equivalent_forward,
    scheduled_quantizers,
)


def cosine_ramp(epoch: int, epochs: int, start: float, end: float) -> float:
    r"""start + (end - start) (1 - cos(pi/2 * epoch / epochs)): the ReSTE o schedule.

    Slow at first, fastest at the end; epoch 0 gives `start`.
    """
    if epochs <= 0:
        raise ConfigError(f"epochs must be > 0 (got {epochs})")
    ratio = min(max(epoch / epochs, 0.0), 1.0)
    return start + (end - start) * (1.0 - math.cos(math.pi / 2.0 * ratio))


def trained_model(model: tf.keras.Model) -> tf.keras.Model:
    """The model whose weights train: a `Distiller`'s student, else `model` itself.

    The callbacks below schedule, measure and log the student alone: a distiller's
    frozen teacher (binary or not) must not enter its frozen fraction or indicators."""
    return model.student if isinstance(model, Distiller) else model


class EstimatorSchedule(tf.keras.callbacks.Callback):
    r"""Sets ReSTE's o, BNN++'s mu and ReCU's tau of every such quantizer at each
    epoch's start.

    o(e) = 1 + (o_end - 1)(1 - cos(pi/2 * e/E)), the reference's schedule (o_end = 3).
    mu(e) = mu_start + (mu_end - mu_start)(1 - cos(pi/2 * e/E)), default 20 -> 200: our
    choice, measured (the BNN++ paper gives no CNN schedule). BNN++ binarizes the
    kernels, whose latent values are ~0.1: SS_mu(w) only resembles sign(w), the
    deployed forward, once mu |w| >~ 2.4, i.e. mu >~ 20. Starting at mu = 5 trained to
    71% but tested at 15% after one epoch on Fashion-MNIST (the network learned real-
    valued weights), starting at 20 tested like STE (README, Results). The derivative
    peaks at mu, which on the kernels only scales the step of near-zero weights.

    tau(e) = A e^(e/E) + B from tau_min 0.85 to tau_max 0.99, ReCU's code and defaults
    (`reste_larq.quantizers.recu_tau_at`).

    The values are logged as `o`, `mu` and `tau` (CSV, TensorBoard) when the model has
    them.
    """

    def __init__(
        self,
        epochs: int,
        o_end: float = 3.0,
        mu_start: float = 20.0,
        mu_end: float = 200.0,
        tau_min: float = 0.85,
        tau_max: float = 0.99,
    ):
        super().__init__()
        if not 0.5 < tau_min <= tau_max < 1.0:
            raise ConfigError(
                f"ReCU's tau needs 0.5 < tau_min <= tau_max < 1 (got {tau_min}, {tau_max})"
            )
        self.tau_min, self.tau_max = tau_min, tau_max
        if epochs <= 0:
            raise ConfigError(f"epochs must be > 0 (got {epochs})")
        if o_end < 1.0:
            raise ConfigError(f"o_end must be >= 1 (got {o_end})")
        if mu_start <= 0.0 or mu_end <= 0.0:
            raise ConfigError(f"mu_start and mu_end must be > 0 (got {mu_start}, {mu_end})")
        self.epochs = epochs
        self.o_end = o_end
        self.mu_start = mu_start
        self.mu_end = mu_end
        self._values: dict[str, float] = {}

    def o_at(self, epoch: int) -> float:
        return cosine_ramp(epoch, self.epochs, 1.0, self.o_end)

    def mu_at(self, epoch: int) -> float:
        return cosine_ramp(epoch, self.epochs, self.mu_start, self.mu_end)

    def tau_at(self, epoch: int) -> float:
        return recu_tau_at(epoch, self.epochs, self.tau_min, self.tau_max)

    def apply(self, model: tf.keras.Model, epoch: int) -> dict[str, float]:
        """Set the values for `epoch` on `model`; returns what was set."""
        values = {}
        for q in scheduled_quantizers(model, ReSTE):
            q.o = values["o"] = self.o_at(epoch)
        for q in scheduled_quantizers(model, BNNpp):
            q.mu = values["mu"] = self.mu_at(epoch)
        for q in scheduled_quantizers(model, ReCU):
            q.tau = values["tau"] = self.tau_at(epoch)
        return values

    def on_epoch_begin(self, epoch, logs=None):
        self._values = self.apply(trained_model(self.model), epoch)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(self._values)

    def get_config(self):
        return {
            "epochs": self.epochs,
            "o_end": self.o_end,
            "mu_start": self.mu_start,
            "mu_end": self.mu_end,
            "tau_min": self.tau_min,
            "tau_max": self.tau_max,
        }


DECAYS = ("cosine", "linear", "step", "sgdr")


def sgdr_restarts(period: int, mult: float, epochs: int) -> list[int]:
    """Restart epochs (counted after warm-up) of `--lr-schedule sgdr`: period * mult^k
    for mult > 1 (period 2, mult 2: 2, 4, 8, ..., the 1-bit WRN code's list), every
    `period` epochs for mult = 1."""
    if period < 1 or mult < 1:
        raise ConfigError(f"sgdr needs period >= 1 and mult >= 1 (got {period}, {mult})")
    restarts, r = [], float(period)
    while r < epochs:
        restarts.append(int(round(r)))
        r = r * mult if mult > 1 else r + period
    return sorted(set(restarts))


def learning_rate_at(
    epoch: int,
    base_lr: float,
    epochs: int,
    warmup_epochs: int = 0,
    decay: str = "cosine",
    *,
    steps=(),
    gamma: float = 0.1,
    restart_period: int = 2,
    restart_mult: float = 2.0,
    min_lr: float = 0.0,
) -> float:
    """The per-epoch learning rate (closed form, a function of the epoch only).

    Warm-up: base * (e + 1) / W for e < W, reaching base at e = W - 1. Then:
    - cosine: base/2 (1 + cos(pi (e - W + 1) / (E - W + 1))), from base at e = W - 1 to 0
      after the last epoch (the ReSTE recipe; README "chosen otherwise" compares it with
      the reference's recursion);
    - linear: base (1 - (e - W + 1) / (E - W + 1)) (the Adam recipe of Bi-Real /
      BNN-tricks);
    - step: base * gamma^(number of `steps` <= e), milestones in epochs as PyTorch's
      MultiStepLR (BNN-tricks' CIFAR-100: steps 150 250 320, gamma 0.2);
    - sgdr: cosine from base to `min_lr` within each cycle, restarting at the epochs
      `sgdr_restarts(restart_period, restart_mult, E - W)` after warm-up (SGDR,
      Loshchilov & Hutter; the 1-bit WRN recipe: period 2, mult 2, min_lr 1e-4).
    """
    if decay not in DECAYS:
        raise ConfigError(f"decay must be one of {', '.join(DECAYS)} (got {decay!r})")
    if warmup_epochs and epoch < warmup_epochs:
        return base_lr * (epoch + 1) / warmup_epochs
    if decay == "step":
        return base_lr * gamma ** sum(1 for milestone in steps if epoch >= milestone)
    if decay == "sgdr":
        t = epoch - warmup_epochs
        bounds = [
            0,
            *sgdr_restarts(restart_period, restart_mult, epochs - warmup_epochs),
            max(epochs - warmup_epochs, 1),
        ]
        start = max(b for b in bounds[:-1] if b <= max(t, 0))
        end = min(b for b in bounds if b > start)
        return min_lr + (base_lr - min_lr) * 0.5 * (
            1 + math.cos(math.pi * (t - start) / (end - start))
        )
    offset = max(warmup_epochs - 1, 0)
    span = max(epochs - offset, 1)
    progress = min(max((epoch - offset) / span, 0.0), 1.0)
    if decay == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (1.0 - progress)


class LearningRateSchedule(tf.keras.callbacks.Callback):
    """Sets the optimizer's learning rate at each epoch's start (`learning_rate_at`,
    whose keyword options `schedule_options` passes on); logs it as `lr`. Stepping once
    per epoch matches the reference."""

    def __init__(
        self,
        base_lr: float,
        epochs: int,
        warmup_epochs: int = 0,
        decay="cosine",
        **schedule_options,
    ):
        super().__init__()
        if base_lr <= 0:
            raise ConfigError(f"learning rate must be > 0 (got {base_lr})")
        if warmup_epochs < 0:
            raise ConfigError(f"warm-up epochs must be >= 0 (got {warmup_epochs})")
        if decay == "step" and not schedule_options.get("steps"):
            raise ConfigError("the step schedule needs its milestones (steps=[...] / --lr-steps)")
        learning_rate_at(0, base_lr, epochs, warmup_epochs, decay, **schedule_options)
        self.base_lr, self.epochs = base_lr, epochs
        self.warmup_epochs, self.decay = warmup_epochs, decay
        self.schedule_options = schedule_options
        self._lr = None

    def lr_at(self, epoch: int) -> float:
        return learning_rate_at(
            epoch,
            self.base_lr,
            self.epochs,
            self.warmup_epochs,
            self.decay,
            **self.schedule_options,
        )

    def on_epoch_begin(self, epoch, logs=None):
        self._lr = self.lr_at(epoch)
        self.model.optimizer.learning_rate.assign(self._lr)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self._lr is not None:
            logs["lr"] = self._lr


FROZEN_THRESHOLD = 1e-3


def binary_kernels(model: tf.keras.Model):
    """The latent (real-valued) kernels of every layer with a 1-bit kernel quantizer."""
    kernels = []
    for layer in model.submodules:
        quantizer = getattr(layer, "kernel_quantizer", None)
        if getattr(quantizer, "precision", None) == 1 and hasattr(layer, "kernel"):
            kernels.append(layer.kernel.latent_variable)
    return kernels


def estimating_error(model: tf.keras.Model, o: float) -> float:
    """ReSTE's estimating error: sum over binary kernels of
    || sign(w) |w|^(1/o) - sign(w) ||_2 (the reference evaluates it at o = o_end)."""
    total = 0.0
    for w in binary_kernels(model):
        w = tf.reshape(w, [-1])
        total += float(tf.norm(reste_equivalent_forward(w, o) - tf.sign(w)))
    return total


def estimator_derivatives(model: tf.keras.Model):
    """[(layer name, d q(w)/dw)] for every 1-bit kernel quantizer: the estimator's
    elementwise derivative at each latent weight (the sign estimator inside a
    `MeanAbsScaled`, without the layer-wide scale)."""
    out = []
    for layer in model.submodules:
        quantizer = getattr(layer, "kernel_quantizer", None)
        if getattr(quantizer, "precision", None) != 1 or not hasattr(layer, "kernel"):
            continue
        if isinstance(quantizer, MeanAbsScaled):
            quantizer = quantizer.quantizer
        if not getattr(quantizer, "elementwise_monotone_estimator", True):
            continue  # ReCU (per-channel standardization), BiPer (a periodic wave)
        w = tf.convert_to_tensor(layer.kernel.latent_variable)
        # the training-mode estimator (BNN++ is a plain sign in inference)
        kwargs = (
            {"training": True} if "training" in inspect.signature(quantizer.call).parameters else {}
        )
        with tf.GradientTape() as tape:
            tape.watch(w)
            q = quantizer(w, **kwargs)
        out.append((layer.name, tape.gradient(q, w)))  # elementwise: the Jacobian diagonal
    return out


def frozen_fraction(model: tf.keras.Model, threshold: float = FROZEN_THRESHOLD) -> float:
    """The fraction of latent binary-kernel weights the loss can no longer flip: those
    whose estimator derivative d q(w)/dw is below `threshold`, i.e. passes (almost)
    nothing of the gradient or passes it reversed. STE freezes |w| > 1, the ReSTE
    reference |w| > 1.5. BNN++'s SignSwish derivative is negative beyond mu |w| ~ 2.4
    (SS_mu overshoots 1 there): a weight the loss wants flipped is pushed *away* from
    zero, one it wants kept drifts back to the overshoot's peak, so once mu is large
    every weight outside |w| < 2.4 / mu keeps its sign. NaN without binary kernels, and
    for ReCU and BiPer, where it means nothing: ReCU's q couples a channel's weights (its
    standardization), so d q / dw is no diagonal, and a clamped weight still moves through
    the others; BiPer's square wave of w flips whichever way a weight moves."""
    frozen = total = 0
    for _, derivative in estimator_derivatives(model):
        frozen += int(tf.reduce_sum(tf.cast(derivative < threshold, tf.int64)))
        total += int(tf.size(derivative))
    return frozen / total if total else float("nan")


class FrozenFraction(tf.keras.callbacks.Callback):
    """Logs `frozen_fraction` (see `frozen_fraction`) at the end of every epoch, so a
    run whose estimator has frozen its weights shows it in history.csv."""

    def __init__(self, threshold: float = FROZEN_THRESHOLD):
        super().__init__()
        self.threshold = threshold

    def on_epoch_end(self, epoch, logs=None):
        value = frozen_fraction(trained_model(self.model), self.threshold)
        if logs is not None and not math.isnan(value):  # NaN: nothing it applies to
            logs["frozen_fraction"] = value


class Indicators(tf.keras.callbacks.Callback):
    """ReSTE's indicators, logged per epoch as `estimating_error` and `gradient_stability`.

    - estimating_error: see `estimating_error`, at `o` (the run's o_end).
    - gradient_stability: sum over binary kernels of Var(|dL/dw|), the gradient taken
      on a fixed training batch in training mode at the end of each epoch (the
      reference reports the value of the epoch's last batch). Lower is more stable.
    """

    def __init__(self, batch, o: float = 3.0):
        super().__init__()
        self.batch = batch
        self.o = o

    def gradient_stability(self) -> float:
        x, y = (tf.convert_to_tensor(t) for t in self.batch)
        student = trained_model(self.model)
        kernels = binary_kernels(student)
        # A training-mode forward updates BN moving statistics: measure, then restore.
        saved = [w.numpy() for w in student.non_trainable_weights]
        with tf.GradientTape() as tape:
            predictions = student(x, training=True)
            # the compiled loss on the labels (a distiller's, too: its CE term)
            loss = self.model.compiled_loss(y, predictions, regularization_losses=student.losses)
        grads = tape.gradient(loss, kernels)
        for w, value in zip(student.non_trainable_weights, saved):
            w.assign(value)
        return float(sum(tf.math.reduce_variance(tf.abs(g)) for g in grads if g is not None))

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        logs["estimating_error"] = estimating_error(trained_model(self.model), self.o)
        stability = self.gradient_stability()
        if not np.isfinite(stability):
            raise FloatingPointError(
                f"gradient of the binary kernels is not finite at epoch {epoch}"
            )
        logs["gradient_stability"] = stability
