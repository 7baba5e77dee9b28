"""reste_larq.training: PyTorch's SGD and coupled weight decay, the loss."""

import numpy as np
import pytest
import tensorflow as tf

from reste_larq import training
from reste_larq.errors import ConfigError


def steps(optimizer, grads, start, lrs):
    var = tf.Variable(start)
    for lr, g in zip(lrs, grads):
        optimizer.learning_rate.assign(lr)
        optimizer.apply_gradients([(tf.constant(g), var)])
    return var.numpy()


def test_torch_sgd_matches_pytorch_formula_with_changing_lr():
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(5).astype(np.float32)
    grads = [rng.standard_normal(5).astype(np.float32) for _ in range(3)]
    lrs = [0.1, 0.05, 0.2]
    got = steps(training.TorchSGD(0.1, momentum=0.9, coupled_weight_decay=0.01), grads, w0, lrs)
    w, b = w0.astype(np.float64), np.zeros(5)
    for lr, g in zip(lrs, grads):
        b = 0.9 * b + g + 0.01 * w
        w = w - lr * b
    np.testing.assert_allclose(got, w, rtol=1e-6)
    # Keras' SGD differs once lr changes: its velocity carries the old rates
    keras = steps(tf.keras.optimizers.SGD(0.1, momentum=0.9), grads, w0, lrs)
    torch_no_decay = steps(training.TorchSGD(0.1, momentum=0.9), grads, w0, lrs)
    assert np.max(np.abs(keras - torch_no_decay)) > 1e-3


def test_coupled_adam_is_adam_on_the_decayed_gradient():
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal(4).astype(np.float32)
    grads = [rng.standard_normal(4).astype(np.float32) for _ in range(3)]
    got = steps(training.CoupledAdam(1e-2, coupled_weight_decay=0.1), grads, w0, [1e-2] * 3)
    # numpy Adam (Keras' epsilon placement) on g + wd * w
    w, m, v = w0.astype(np.float64), np.zeros(4), np.zeros(4)
    for t, g in enumerate(grads, start=1):
        g = g + 0.1 * w
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        alpha = 1e-2 * np.sqrt(1 - 0.999**t) / (1 - 0.9**t)
        w = w - alpha * m / (np.sqrt(v) + 1e-7)
    np.testing.assert_allclose(got, w, rtol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: training.TorchSGD(0.1, 0.9, coupled_weight_decay=1e-4),
        lambda: training.CoupledAdam(1e-3, coupled_weight_decay=1e-4),
    ],
)
def test_optimizer_config_round_trip(make):
    optimizer = make()
    config = tf.keras.optimizers.serialize(optimizer)
    again = tf.keras.optimizers.deserialize(config)
    assert type(again) is type(optimizer)
    assert again.coupled_weight_decay == optimizer.coupled_weight_decay == 1e-4


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: training.TorchSGD(0.1, coupled_weight_decay=-1),
            "coupled_weight_decay must be >= 0",
        ),
        (lambda: training.TorchSGD(0.1, nesterov=True), "nesterov is not offered"),
        (lambda: training.TorchSGD(0.1, weight_decay=1e-4), "use coupled_weight_decay"),
        (lambda: training.CoupledAdam(weight_decay=1e-4), "AdamW"),
        (lambda: training.make_optimizer("lamb", 0.1), "choose one of sgd, adam"),
        (lambda: training.sparse_cross_entropy(10, 1.0), r"label_smoothing must be in \[0, 1\)"),
    ],
)
def test_bad_values(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_label_smoothing_loss_against_numpy():
    logits = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    labels = np.array([4, 0, 2])
    for eps in (0.0, 0.1):
        target = np.full((3, 5), eps / 5)
        target[np.arange(3), labels] += 1 - eps
        log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        expected = np.mean(-(target * log_p).sum(1))
        loss = training.sparse_cross_entropy(5, eps)(labels, logits)
        assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_cross_entropy_takes_soft_labels_and_top_k_reads_them():
    logits = tf.constant([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    soft = tf.constant([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6]])
    log_p = logits.numpy() - np.log(np.exp(logits.numpy()).sum(axis=1, keepdims=True))
    expected = np.mean(-(soft.numpy() * log_p).sum(axis=1))
    loss = training.sparse_cross_entropy(3)
    assert float(loss(soft, logits)) == pytest.approx(expected, rel=1e-6)
    smoothed = training.sparse_cross_entropy(3, 0.1)
    target = 0.9 * soft.numpy() + 0.1 / 3
    assert float(smoothed(soft, logits)) == pytest.approx(
        np.mean(-(target * log_p).sum(axis=1)), rel=1e-6
    )
    assert float(loss(tf.constant([0, 2]), logits)) == pytest.approx(
        -(log_p[0, 0] + log_p[1, 2]) / 2, rel=1e-6
    )
    top1 = training.top_k_accuracy(3, 1)
    top1.update_state(tf.constant([[0.2, 0.8, 0.0], [0.0, 0.4, 0.6]]), logits)
    assert float(top1.result()) == pytest.approx(0.5)  # row 0: argmax 1 vs logits' 0
    top1.reset_state()
    top1.update_state(tf.constant([0, 2]), logits)
    assert float(top1.result()) == 1.0


def _net(quantizer, a32, widths=(8, 8), extra_dense=False):
    from reste_larq.models.blocks import BinarySpec, binary_conv_block, classifier_head

    spec = BinarySpec(quantizer=quantizer, a32=a32)
    inputs = tf.keras.Input((8, 8, 3))
    x = tf.keras.layers.Conv2D(widths[0], 3, padding="same", use_bias=False)(inputs)
    x = binary_conv_block(x, spec, widths[1])
    x = classifier_head(x, 5)
    if extra_dense:
        x = tf.keras.layers.Dense(5)(x)
    return tf.keras.Model(inputs, x)


def _checkpoint(model, directory, distilled=False):
    saved = tf.train.Checkpoint(student=model) if distilled else model
    return tf.train.Checkpoint(model=saved).save(str(directory / "ckpt"))


@pytest.mark.parametrize("distilled", [False, True])
def test_restore_weights_loads_every_weight_and_skips_estimator_state(tmp_path, distilled):
    """A 1W32A run into its 1W1A twin: the activation quantizers' o is not a weight."""
    source = _net("reste", a32=True)
    path = _checkpoint(source, tmp_path, distilled)
    twin = _net("reste", a32=False)
    training.restore_weights(twin, path, distilled=distilled)
    for a, b in zip(source.get_weights(), twin.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_restore_weights_names_what_the_checkpoint_lacks(tmp_path):
    """One matched variable used to be enough (`assert_nontrivial_match`)."""
    path = _checkpoint(_net("reste", a32=False), tmp_path)
    with pytest.raises(ConfigError, match=r"does not hold 2 of the model's \d+ weights.*dense"):
        training.restore_weights(_net("reste", a32=False, extra_dense=True), path)
    with pytest.raises(ConfigError, match="does not hold"):  # the student, not a Distiller
        training.restore_weights(_net("reste", a32=False), path, distilled=True)


def test_restore_weights_names_a_weight_of_another_shape(tmp_path):
    path = _checkpoint(_net("reste", a32=False), tmp_path)
    with pytest.raises(ConfigError, match=r"another architecture.*shape"):
        training.restore_weights(_net("reste", a32=False, widths=(8, 16)), path)
