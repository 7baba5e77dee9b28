import math

import numpy as np
import pytest
import tensorflow as tf

from reste_larq import callbacks as cb
from reste_larq import models
from reste_larq import quantizers as Q


def test_cosine_ramp_is_the_reference_o_schedule():
    epochs, o_end = 10, 3.0
    values = [cb.cosine_ramp(e, epochs, 1.0, o_end) for e in range(epochs + 1)]
    assert values[0] == 1.0 and values[-1] == pytest.approx(o_end)
    for e, v in enumerate(values):  # the reference: 1 + (o_end - 1)(1 - cos(pi/2 e/E))
        assert v == pytest.approx(1 + (o_end - 1) * (1 - math.cos(math.pi / 2 * e / epochs)))
    assert all(b > a for a, b in zip(values, values[1:]))


class Recorder(tf.keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = {}

    def on_train_batch_begin(self, batch, logs=None):
        epoch = self.epoch
        values = [q.schedule_variable.numpy() for q in Q.scheduled_quantizers(self.model)]
        self.seen.setdefault(epoch, set()).update(float(v) for v in values)
        self.seen.setdefault(("lr", epoch), set()).add(float(self.model.optimizer.learning_rate.numpy()))

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch


def tiny(quantizer):
    return models.build("resnet20_1w1a", quantizer=quantizer, input_shape=(8, 8, 1), num_classes=3)


@pytest.mark.parametrize("quantizer", ["reste", "bnnpp", "bnnpp_all"])
def test_schedule_sets_every_quantizer_and_is_identical_after_resume(quantizer):
    x = np.random.default_rng(0).standard_normal((8, 8, 8, 1)).astype(np.float32)
    y = np.arange(8) % 3
    epochs = 5

    def run(initial_epoch):
        model = tiny(quantizer)
        # reste: activations and kernels; bnnpp: kernels (STE activations)
        assert len(Q.scheduled_quantizers(model)) == (18 if quantizer == "bnnpp" else 2 * 18)
        model.compile(tf.keras.optimizers.SGD(0.1), tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        recorder = Recorder()
        model.fit(x, y, batch_size=4, epochs=epochs, initial_epoch=initial_epoch, verbose=0,
                  callbacks=[cb.EstimatorSchedule(epochs, o_end=3.0, mu_start=1.0, mu_end=10.0),
                             cb.LearningRateSchedule(0.1, epochs, warmup_epochs=2), recorder])
        return recorder.seen

    full, resumed = run(0), run(3)
    schedule = cb.EstimatorSchedule(epochs, o_end=3.0, mu_start=1.0, mu_end=10.0)  # as trained
    for epoch in range(epochs):
        expected = schedule.o_at(epoch) if quantizer == "reste" else schedule.mu_at(epoch)
        (value,) = full[epoch]  # one value shared by every quantizer
        assert value == pytest.approx(expected, rel=1e-6)
        (lr,) = full[("lr", epoch)]
        assert lr == pytest.approx(cb.learning_rate_at(epoch, 0.1, epochs, 2), rel=1e-6)
    for epoch in (3, 4):
        assert resumed[epoch] == full[epoch]
        assert resumed[("lr", epoch)] == full[("lr", epoch)]


def test_learning_rate_warmup_then_cosine_as_reference():
    base, epochs, warmup = 0.1, 20, 5
    lrs = [cb.learning_rate_at(e, base, epochs, warmup) for e in range(epochs)]
    assert lrs[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    # After warm-up: CosineAnnealingLR(T_max = E - 4) stepped once per epoch from epoch 4.
    for e in range(5, epochs):
        assert lrs[e] == pytest.approx(base / 2 * (1 + math.cos(math.pi * (e - 4) / (epochs - 4))))
    assert all(b < a for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] > 0
    no_warmup = [cb.learning_rate_at(e, base, epochs) for e in range(epochs)]
    assert no_warmup[0] == base and no_warmup[10] == pytest.approx(base / 2)
    linear = [cb.learning_rate_at(e, base, 10, decay="linear") for e in range(10)]
    assert linear == pytest.approx([base * (1 - e / 10) for e in range(10)])


@pytest.mark.parametrize("make, message", [
    (lambda: cb.EstimatorSchedule(0), "epochs must be > 0"),
    (lambda: cb.EstimatorSchedule(10, o_end=0.5), "o_end must be >= 1"),
    (lambda: cb.EstimatorSchedule(10, mu_end=0), "mu_start and mu_end must be > 0"),
    (lambda: cb.LearningRateSchedule(0.0, 10), "learning rate must be > 0"),
    (lambda: cb.LearningRateSchedule(0.1, 10, decay="step"), "decay must be 'cosine' or 'linear'"),
])
def test_bad_schedule_values(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_estimating_error_formula():
    model = tiny("ste")
    kernels = cb.binary_kernels(model)
    assert len(kernels) == 18
    expected = sum(
        np.linalg.norm(np.sign(w) * np.abs(w) ** (1 / 3.0) - np.sign(w))
        for w in (k.numpy().ravel() for k in kernels)
    )
    assert cb.estimating_error(model, 3.0) == pytest.approx(expected, rel=1e-5)
    # o = 1 is the identity: error is || w - sign(w) ||, larger than at o = 3 for |w| < 1
    assert cb.estimating_error(model, 1.0) > cb.estimating_error(model, 3.0)


def test_indicators_log_finite_values_and_leave_bn_statistics_alone():
    model = tiny("reste")
    model.compile(tf.keras.optimizers.SGD(0.01), tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).standard_normal((8, 8, 8, 1)).astype(np.float32)
    y = np.arange(8) % 3
    indicators = cb.Indicators((x, y), o=3.0)
    indicators.set_model(model)
    before = [w.numpy() for w in model.non_trainable_weights]
    logs = {}
    indicators.on_epoch_end(0, logs)
    assert logs["estimating_error"] > 0 and np.isfinite(logs["estimating_error"])
    assert logs["gradient_stability"] > 0 and np.isfinite(logs["gradient_stability"])
    for a, b in zip(before, model.non_trainable_weights):
        np.testing.assert_array_equal(a, b.numpy())
