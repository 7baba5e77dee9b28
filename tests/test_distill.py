"""reste_larq.distill: the loss against numpy, a frozen teacher, a student that trains,
saves, restores and exports alone."""

import numpy as np
import pytest
import tensorflow as tf

from reste_larq import export, models, training
from reste_larq.distill import Distiller, distillation_kl
from reste_larq.errors import ConfigError


def np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


@pytest.mark.parametrize("alpha, temperature", [(1.0, 1.0), (0.5, 4.0), (0.0, 2.0)])
def test_loss_equals_the_formula(alpha, temperature):
    """Hand-made logits: (1 - a) CE(y, s) + a T^2 KL(softmax(t/T) || softmax(s/T))."""
    s = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0], [-2.0, 1.0, 1.0]], np.float32)
    t = np.array([[1.0, 0.0, -1.0], [0.0, 0.0, 2.0], [3.0, -1.0, 0.0]], np.float32)
    y = np.array([0, 2, 1])
    log_pt, log_ps = np_log_softmax(t / temperature), np_log_softmax(s / temperature)
    kl = temperature**2 * np.mean(np.sum(np.exp(log_pt) * (log_pt - log_ps), axis=1))
    ce = np.mean(-np_log_softmax(s)[np.arange(3), y])
    expected = (1 - alpha) * ce + alpha * kl

    student = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Identity()])
    teacher = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Identity()])
    distiller = Distiller(student, teacher, alpha, temperature)
    distiller.compile(loss=training.sparse_cross_entropy(3))
    total, kd = distiller.loss_value(tf.constant(y), tf.constant(s), tf.constant(t))
    assert float(total) == pytest.approx(expected, rel=1e-5)
    assert float(kd) == pytest.approx(kl, rel=1e-5)
    assert float(tf.reduce_mean(distillation_kl(t, t, temperature))) == pytest.approx(0, abs=1e-6)
    if alpha == 0.0:  # plain cross-entropy
        assert float(total) == pytest.approx(ce, rel=1e-6)


def test_teacher_frozen_student_trains_saves_and_exports_alone(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 8, 8, 3)).astype(np.float32)
    y = np.arange(16) % 4
    student = models.build("resnet20_1w1a", quantizer="reste", input_shape=(8, 8, 3), num_classes=4)
    teacher = models.build("resnet20_1w1a", quantizer="float", input_shape=(8, 8, 3), num_classes=4)
    teacher_before = [w.numpy() for w in teacher.weights]
    student_before = [w.numpy() for w in student.trainable_weights]
    distiller = Distiller(student, teacher, alpha=0.5, temperature=2.0)
    distiller.compile(
        training.TorchSGD(0.1, 0.9, 1e-4), training.sparse_cross_entropy(4), ["accuracy"]
    )
    history = distiller.fit(x, y, batch_size=8, epochs=2, verbose=0, validation_data=(x, y)).history
    assert {"loss", "kd_loss", "accuracy", "val_loss", "val_accuracy"} <= set(history)
    assert all(np.isfinite(history["loss"]))
    for a, b in zip(teacher_before, teacher.weights):  # BN statistics included
        np.testing.assert_array_equal(a, b.numpy())
    assert (
        sum(
            not np.array_equal(a, b.numpy())
            for a, b in zip(student_before, student.trainable_weights)
        )
        > 10
    )

    student.save_weights(str(tmp_path / "student.weights.h5"))
    again = models.build("resnet20_1w1a", quantizer="reste", input_shape=(8, 8, 3), num_classes=4)
    again.load_weights(str(tmp_path / "student.weights.h5"))
    np.testing.assert_array_equal(again(x, training=False), student(x, training=False))

    flatbuffer = export.convert(distiller.student)  # the student only
    assert export.op_counts(flatbuffer)["LceBconv2d"] == 18
    assert len(flatbuffer) < 4 * teacher.count_params() / 5  # the float teacher: 1.1 MB


def test_bad_settings():
    a = models.build("resnet20_1w1a", input_shape=(8, 8, 3), num_classes=4)
    b = models.build("resnet20_1w1a", input_shape=(8, 8, 3), num_classes=5)
    with pytest.raises(ConfigError, match="teacher has 5 classes, the student 4"):
        Distiller(a, b)
    with pytest.raises(ConfigError, match=r"alpha must be in \[0, 1\]"):
        Distiller(a, a, alpha=1.5)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        Distiller(a, a, temperature=0)


def test_callbacks_see_the_student_alone():
    """EstimatorSchedule, FrozenFraction and Indicators on a Distiller: a binary teacher's
    quantizers keep their o, and its kernels (all beyond every estimator's window here)
    enter neither the frozen fraction nor the indicators."""
    from reste_larq import callbacks as cb
    from reste_larq.quantizers import ReSTE, scheduled_quantizers
    from tests.test_models import two_conv_net

    tf.keras.utils.set_random_seed(3)
    student, teacher = two_conv_net("reste", False), two_conv_net("reste", False)
    for kernel in cb.binary_kernels(teacher):
        kernel.assign(tf.fill(kernel.shape, 5.0))  # frozen under every estimator
    distiller = Distiller(student, teacher)
    distiller.compile(
        optimizer=training.TorchSGD(0.01, momentum=0.9), loss=training.sparse_cross_entropy(5)
    )
    x = np.random.default_rng(0).standard_normal((8, 8, 8, 3)).astype(np.float32)
    y = np.arange(8) % 5
    schedule = cb.EstimatorSchedule(4, o_end=3.0)
    frozen, indicators = cb.FrozenFraction(), cb.Indicators((x, y), o=3.0)
    teacher_stats = [w.numpy() for w in teacher.non_trainable_weights]
    logs = {}
    for callback in (schedule, frozen, indicators):
        callback.set_model(distiller)
    schedule.on_epoch_begin(3)
    frozen.on_epoch_end(0, logs)
    indicators.on_epoch_end(0, logs)

    assert {q.o for q in scheduled_quantizers(student, ReSTE)} == {np.float32(schedule.o_at(3))}
    assert {q.o for q in scheduled_quantizers(teacher, ReSTE)} == {1.0}
    assert logs["frozen_fraction"] == cb.frozen_fraction(student) < 0.5
    assert logs["estimating_error"] == cb.estimating_error(student, 3.0)
    alone = cb.Indicators((x, y), o=3.0)
    student.compile(loss=training.sparse_cross_entropy(5))
    alone.set_model(student)
    assert logs["gradient_stability"] == pytest.approx(alone.gradient_stability(), rel=1e-5)
    for w, value in zip(teacher.non_trainable_weights, teacher_stats):
        np.testing.assert_array_equal(w.numpy(), value)


MIRRORED_EVALUATION = """
import json
import reste_larq  # first: Keras 2
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from reste_larq import training
from reste_larq.distill import Distiller
from tests.test_models import two_conv_net


def distiller():
    d = Distiller(two_conv_net("reste", False), two_conv_net("float", False), alpha=0.5)
    d.compile(loss=training.sparse_cross_entropy(5), metrics=["accuracy"])
    return d


tf.keras.utils.set_random_seed(0)
x = np.random.default_rng(0).standard_normal((16, 8, 8, 3)).astype("float32")
data = tf.data.Dataset.from_tensor_slices((x, np.arange(16) % 5)).batch(8)
one = distiller()
with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
    two = distiller()
two.set_weights(one.get_weights())
print(json.dumps([m.evaluate(data, verbose=0, return_dict=True)["loss"] for m in (one, two)]))
"""


@pytest.mark.slow  # a subprocess: logical devices must be set before TensorFlow starts
def test_distiller_val_loss_is_the_same_on_two_replicas():
    """Keras scales the compiled loss by 1 / replicas; test_step must undo it as
    train_step does, or a distilled run's val_loss halves under --strategy mirrored."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", MIRRORED_EVALUATION],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = json.loads(done.stdout.strip().splitlines()[-1])
    assert two == pytest.approx(one, abs=1e-5)
