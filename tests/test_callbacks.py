import numpy as np
import pytest
import tensorflow as tf

from reste_larq import callbacks as cb
from reste_larq import models
from reste_larq import quantizers as Q
from tests.test_models import two_conv_net


def reference_o(epoch, epochs, o_end):
    """The reference's o (main.py, `ReSTE(epoch)`), written out with numpy."""
    return 1 + (1 - np.cos(epoch / epochs * np.pi * 0.5)) * (o_end - 1)


def reference_learning_rates(base, epochs, warm_up):
    """Per-epoch learning rates of the reference's main.py, by PyTorch's recursion.

    SGD(lr=base), then CosineAnnealingLR(T_max = E - 4*warm_up, eta_min = 0,
    last_epoch = start_epoch - 4*warm_up) with start_epoch = -1; the constructor takes
    one step. Each epoch: lr = base (e+1)/5 if warm_up and e < 5; train; then
    `lr_scheduler.step()` if e >= 4*warm_up. PyTorch's (2.0) CosineAnnealingLR.get_lr:
    last_epoch == 0 keeps lr; (last - 1 - T) % 2T == 0 adds base (1 - cos(pi/T))/2;
    else lr *= (1 + cos(pi last/T)) / (1 + cos(pi (last - 1)/T)).
    """
    offset = 4 * int(warm_up)
    t_max = epochs - offset
    state = {"lr": base, "last": -1 - offset}

    def step():
        state["last"] += 1
        last, lr = state["last"], state["lr"]
        if last == 0:
            return
        if (last - 1 - t_max) % (2 * t_max) == 0:
            state["lr"] = lr + base * (1 - np.cos(np.pi / t_max)) / 2
        else:
            state["lr"] = (
                (1 + np.cos(np.pi * last / t_max)) / (1 + np.cos(np.pi * (last - 1) / t_max)) * lr
            )

    step()  # the constructor's initial step
    rates = []
    for epoch in range(epochs):
        if warm_up and epoch < 5:
            state["lr"] = base * (epoch + 1) / 5
        rates.append(state["lr"])
        if epoch >= offset:
            step()
    return np.array(rates)


def test_o_schedule_is_the_reference():
    epochs, o_end = 10, 3.0
    values = [cb.EstimatorSchedule(epochs, o_end=o_end).o_at(e) for e in range(epochs)]
    np.testing.assert_allclose(
        values, [reference_o(e, epochs, o_end) for e in range(epochs)], rtol=1e-12
    )
    assert values[0] == 1.0 and all(b > a for a, b in zip(values, values[1:]))


def test_learning_rate_without_warmup_is_the_reference():
    for epochs in (7, 200, 1000):
        ours = [cb.learning_rate_at(e, 0.1, epochs) for e in range(epochs)]
        np.testing.assert_allclose(ours, reference_learning_rates(0.1, epochs, False), rtol=1e-9)


def test_learning_rate_with_warmup_against_the_reference():
    """Warm-up epochs are identical; after them the reference's cosine runs 4 epochs
    later (its scheduler starts at last_epoch = -5 and keeps lr at last_epoch = 0) and
    never reaches 0. Ours ends at 0 on the last epoch. The README states the bound."""
    base, epochs = 0.1, 1000
    ref = reference_learning_rates(base, epochs, True)
    ours = np.array([cb.learning_rate_at(e, base, epochs, 5) for e in range(epochs)])
    np.testing.assert_allclose(ours[:5], [0.02, 0.04, 0.06, 0.08, 0.1], rtol=1e-12)
    np.testing.assert_allclose(ours[:5], ref[:5], rtol=1e-12)
    # The reference, in closed form: cosine from base over E - 4 epochs, 4 epochs late.
    shifted = base / 2 * (1 + np.cos(np.pi * (np.arange(5, epochs) - 8) / (epochs - 4)))
    np.testing.assert_allclose(ref[5:], shifted, rtol=1e-3)
    # Ours is the same cosine without the 4-epoch delay.
    ours_closed = base / 2 * (1 + np.cos(np.pi * (np.arange(5, epochs) - 4) / (epochs - 4)))
    np.testing.assert_allclose(ours[5:], ours_closed, rtol=1e-12)
    gap = np.max(np.abs(ours - ref)) / base
    assert 0.005 < gap < 0.0065  # README: at most 0.65 % of the base rate
    assert ours[-1] < 1e-5 * base and ref[-1] > 2e-5 * base


def test_linear_decay_reaches_zero_after_the_last_epoch():
    linear = [cb.learning_rate_at(e, 0.1, 10, decay="linear") for e in range(10)]
    np.testing.assert_allclose(linear, 0.1 * (1 - np.arange(10) / 10), rtol=1e-12)


class Recorder(tf.keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = {}

    def on_train_batch_begin(self, batch, logs=None):
        epoch = self.epoch
        values = [q.schedule_variable.numpy() for q in Q.scheduled_quantizers(self.model)]
        self.seen.setdefault(epoch, set()).update(float(v) for v in values)
        self.seen.setdefault(("lr", epoch), set()).add(
            float(self.model.optimizer.learning_rate.numpy())
        )

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch


def tiny(quantizer):
    return models.build("resnet20_1w1a", quantizer=quantizer, input_shape=(8, 8, 1), num_classes=3)


@pytest.mark.parametrize(
    "quantizer",
    ["reste", "bnnpp", pytest.param("bnnpp_all", marks=pytest.mark.slow)],
)
def test_schedule_sets_every_quantizer_and_is_identical_after_resume(quantizer):
    x = np.random.default_rng(0).standard_normal((8, 8, 8, 3)).astype(np.float32)
    y = np.arange(8) % 3
    epochs = 5

    def run(initial_epoch):
        model = two_conv_net(quantizer, a32=False)  # ResNet-20's blocks, two of them
        # reste: activations and kernels; bnnpp: kernels (STE activations)
        assert len(Q.scheduled_quantizers(model)) == (2 if quantizer == "bnnpp" else 2 * 2)
        model.compile(
            tf.keras.optimizers.SGD(0.1),
            tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        recorder = Recorder()
        model.fit(
            x,
            y,
            batch_size=4,
            epochs=epochs,
            initial_epoch=initial_epoch,
            verbose=0,
            callbacks=[
                cb.EstimatorSchedule(epochs, o_end=3.0, mu_start=1.0, mu_end=10.0),
                cb.LearningRateSchedule(0.1, epochs, warmup_epochs=2),
                recorder,
            ],
        )
        return recorder.seen

    full, resumed = run(0), run(3)
    ramp = 1 - np.cos(np.pi / 2 * np.arange(epochs) / epochs)  # the reference's
    expected = 1 + 2 * ramp if quantizer == "reste" else 1 + 9 * ramp  # o 1->3, mu 1->10
    # warm-up 2: 0.05, 0.1; then cosine from 0.1 at epoch 1 reaching 0 at epoch 5
    expected_lr = [0.05, 0.1] + [0.05 * (1 + np.cos(np.pi * (e - 1) / 4)) for e in (2, 3, 4)]
    for epoch in range(epochs):
        (value,) = full[epoch]  # one value shared by every quantizer
        assert value == pytest.approx(expected[epoch], rel=1e-6)
        (lr,) = full[("lr", epoch)]
        assert lr == pytest.approx(expected_lr[epoch], rel=1e-6)
    for epoch in (3, 4):
        assert resumed[epoch] == full[epoch]
        assert resumed[("lr", epoch)] == full[("lr", epoch)]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: cb.EstimatorSchedule(0), "epochs must be > 0"),
        (lambda: cb.EstimatorSchedule(10, o_end=0.5), "o_end must be >= 1"),
        (lambda: cb.EstimatorSchedule(10, mu_end=0), "mu_start and mu_end must be > 0"),
        (lambda: cb.LearningRateSchedule(0.0, 10), "learning rate must be > 0"),
        (
            lambda: cb.LearningRateSchedule(0.1, 10, decay="exp"),
            "decay must be one of cosine, linear, step, sgdr",
        ),
        (lambda: cb.LearningRateSchedule(0.1, 10, decay="step"), "needs its milestones"),
        (lambda: cb.LearningRateSchedule(0.1, 10, decay="sgdr", restart_period=0), "sgdr needs"),
    ],
)
def test_bad_schedule_values(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def set_kernels(model, rng):
    """Give every binary kernel chosen values: 0, both signs, |w| < 1 and > 1."""
    kernels = cb.binary_kernels(model)
    for k in kernels:
        values = rng.choice([0.0, 0.05, -0.05, 0.3, -0.7, 1.0, -1.0, 2.5, -4.0], k.shape)
        k.assign(values.astype(np.float32))
    return kernels


def test_estimating_error_against_numpy_on_set_kernels():
    model = tiny("ste")
    kernels = set_kernels(model, np.random.default_rng(1))
    assert len(kernels) == 18
    for o in (1.0, 2.0, 3.0):
        expected = 0.0
        for k in kernels:
            w = k.numpy().astype(np.float64).ravel()
            # the reference's ReSTE_Forward: w^(1/o) for w > 0, -(-w)^(1/o) for w <= 0
            forward = np.where(w > 0, np.abs(w) ** (1 / o), -(np.abs(w) ** (1 / o)))
            expected += np.linalg.norm(forward - np.sign(w))
        assert cb.estimating_error(model, o) == pytest.approx(expected, rel=1e-5)
    assert cb.estimating_error(model, 1.0) > cb.estimating_error(model, 3.0) > 0


def test_indicators_against_numpy_and_leave_bn_statistics_alone():
    model = tiny("reste")
    model.compile(
        tf.keras.optimizers.SGD(0.01),
        tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    kernels = set_kernels(model, np.random.default_rng(2))
    saved = model.get_weights()
    x = np.random.default_rng(0).standard_normal((8, 8, 8, 1)).astype(np.float32)
    y = np.arange(8) % 3
    # The gradient stability, computed independently: Var(|dL/dw|) per binary kernel,
    # summed, with the gradient of the plain loss (no L2 term, as the reference's p.grad).
    with tf.GradientTape() as tape:
        loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
            y, model(x, training=True)
        )
    grads = tape.gradient(loss, kernels)
    expected_stability = sum(np.var(np.abs(g.numpy().astype(np.float64))) for g in grads)
    expected_error = cb.estimating_error(model, 3.0)
    model.set_weights(saved)  # undo the BN statistics that forward pass moved

    before = [w.numpy() for w in model.non_trainable_weights]
    indicators = cb.Indicators((x, y), o=3.0)
    indicators.set_model(model)
    logs = {}
    indicators.on_epoch_end(0, logs)
    assert logs["estimating_error"] == pytest.approx(expected_error, rel=1e-6)
    assert logs["gradient_stability"] == pytest.approx(expected_stability, rel=1e-4)
    for a, b in zip(before, model.non_trainable_weights):
        np.testing.assert_array_equal(a, b.numpy())


def test_step_schedule_composes_with_warmup():
    lrs = [cb.learning_rate_at(e, 0.1, 12, 2, "step", steps=[5, 9], gamma=0.2) for e in range(12)]
    expected = [0.05, 0.1, 0.1, 0.1, 0.1, 0.02, 0.02, 0.02, 0.02, 0.004, 0.004, 0.004]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)


def wrn_code_learning_rates(epochs, lr=0.1, lr_min=1e-4, restarts=(2, 4, 8, 16, 32, 64, 128)):
    """szagoruyko/binary-wide-resnet main.py's loop, run with PyTorch 0.4.1's scheduler
    rules (its requirements: torch >= 0.4.1, 2018), written out with numpy:

        scheduler = CosineAnnealingLR(optimizer, T_max=2, eta_min=lr_min)
        for epoch in range(epochs):
            scheduler.step()
            if epoch in restarts:
                scheduler = CosineAnnealingLR(optimizer, T_max=epoch, eta_min=lr_min)
            train()  # at the optimizer's lr

    0.4.1's _LRScheduler.__init__ runs step(last_epoch + 1), which sets the lr for
    last_epoch 0, then resets last_epoch to -1; step() increments last_epoch and sets
    lr = eta_min + (initial_lr - eta_min) (1 + cos(pi last_epoch / T_max)) / 2, where
    initial_lr is the optimizer's first lr (setdefault: a new scheduler keeps it)."""

    class Cosine:
        def __init__(self, t_max):
            self.t_max, self.last_epoch = t_max, -1
            self.lr = self.closed_form(0)

        def closed_form(self, last_epoch):
            return lr_min + (lr - lr_min) * (1 + np.cos(np.pi * last_epoch / self.t_max)) / 2

        def step(self):
            self.last_epoch += 1
            self.lr = self.closed_form(self.last_epoch)

    scheduler, trained_at = Cosine(2), []
    for epoch in range(epochs):
        scheduler.step()
        if epoch in restarts:
            scheduler = Cosine(epoch)
        trained_at.append(scheduler.lr)
    return np.array(trained_at)


def test_sgdr_against_the_1bit_wrn_codes_loop():
    """--lr-schedule sgdr with the WRN recipe (period 2, mult 2, lr_min 1e-4) restarts
    where the WRN code restarts, with the same cosines. The difference, stated in
    docs/reference.md: under PyTorch 0.4.1 the code trains each cycle's first rate twice
    (the new scheduler's own rate at the restart epoch, then its first step) and never
    reaches the cycle's last rate; ours runs each cycle's cosine in full, so from the
    second cycle on, the code's epoch e trains at our epoch e - 1's rate."""
    assert cb.sgdr_restarts(2, 2, 256) == [2, 4, 8, 16, 32, 64, 128]
    assert cb.sgdr_restarts(3, 1, 10) == [3, 6, 9]
    ours = np.array([cb.learning_rate_at(e, 0.1, 256, 0, "sgdr", min_lr=1e-4) for e in range(256)])
    code = wrn_code_learning_rates(256)
    restarts = [2, 4, 8, 16, 32, 64, 128]
    np.testing.assert_allclose(ours[:2], code[:2], rtol=1e-12)  # the first cycle: equal
    np.testing.assert_allclose(ours[restarts], code[restarts], rtol=1e-12)  # lr at restarts
    shifted = [e for e in range(3, 256) if e not in restarts]
    np.testing.assert_allclose(code[shifted], ours[[e - 1 for e in shifted]], rtol=1e-12)
    # with warm-up, the cycles start after it
    warm = [
        cb.learning_rate_at(e, 0.1, 20, 3, "sgdr", restart_period=4, restart_mult=1)
        for e in range(20)
    ]
    assert warm[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1]) and warm[3] == warm[7] == 0.1


@pytest.mark.parametrize("quantizer", ["ste", "reste", "bnnpp"])
def test_frozen_fraction_counts_weights_the_estimator_no_longer_moves(quantizer):
    """Kernels set to a known spread; the frozen fraction against each estimator's
    derivative written out here: STE passes nothing beyond |w| > 1, the ReSTE reference
    nothing beyond |w| > 1.5, BNN++'s SignSwish mu (2 - mu w tanh(mu w / 2)) /
    (1 + cosh(mu w)) is negative (weights move away from a flip) beyond mu |w| ~ 2.4."""
    from reste_larq import models

    model = models.build("resnet20_1w1a", quantizer=quantizer, input_shape=(8, 8, 3))
    schedule = cb.EstimatorSchedule(10, mu_start=20.0, mu_end=200.0)
    schedule.set_model(model)
    schedule.on_epoch_begin(9)
    values = []
    for layer in model.layers:
        if getattr(layer, "kernel_quantizer", None) is not None:
            k = layer.kernel.latent_variable
            v = np.random.default_rng(len(values)).uniform(-2.5, 2.5, k.shape).astype("float32")
            k.assign(v)
            values.append(v.ravel())
    w = np.concatenate(values).astype(np.float64)
    if quantizer == "ste":
        expected = np.mean(np.abs(w) > 1)
    elif quantizer == "reste":
        expected = np.mean(np.abs(w) > 1.5)
    else:
        mu = schedule.mu_at(9)
        with np.errstate(over="ignore"):
            d = mu * (2 - mu * w * np.tanh(mu * w / 2)) / (1 + np.cosh(mu * w))
        expected = np.mean(d < 1e-3)
        # the reversed slopes count: |d| < 1e-3 alone would miss 2.4 < mu |w| < ~14
        assert expected - np.mean(np.abs(d) < 1e-3) > 0.01
        assert np.mean(np.abs(w) < 2.4 / mu) == pytest.approx(1 - expected, abs=1e-3)
    assert cb.frozen_fraction(model) == pytest.approx(expected, abs=1e-3)
    assert np.isnan(cb.frozen_fraction(models.build("resnet20_1w1a", quantizer="float")))
