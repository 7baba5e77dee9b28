"""Knowledge distillation: a Keras model that trains a student against a frozen teacher.

\\[
L = (1 - \\alpha)\\,\\mathrm{CE}(y, s) + \\alpha\\,T^2\\,
    \\mathrm{KL}\\big(\\mathrm{softmax}(t / T)\\,\\|\\,\\mathrm{softmax}(s / T)\\big)
\\]

with s the student's and t the teacher's logits (Hinton et al.; α = 1, T = 1 is
ReActNet's distribution loss from a real-valued teacher). The CE term is the compiled
loss (label smoothing included). The teacher runs in inference mode and gets no
gradient; the student is the model that trains, is evaluated (`test_step` is the
student's) and is exported.

```python
student = models.build("resnet20_1w1a", quantizer="reste")
teacher = models.build("resnet20_1w1a", quantizer="float")   # trained beforehand
distiller = Distiller(student, teacher, alpha=1.0, temperature=1.0)
distiller.compile(TorchSGD(0.1, 0.9, 1e-4), sparse_cross_entropy(10), ["accuracy"])
distiller.fit(data, epochs=E, callbacks=[EstimatorSchedule(E)])
flatbuffer = export.convert(distiller.student)
```
"""

from __future__ import annotations

import tensorflow as tf

from reste_larq.errors import ConfigError


def distillation_kl(teacher_logits, student_logits, temperature: float = 1.0):
    """Per-example T² · KL(softmax(t/T) ‖ softmax(s/T)), computed in float32."""
    t = tf.cast(teacher_logits, tf.float32) / temperature
    s = tf.cast(student_logits, tf.float32) / temperature
    log_p_teacher = tf.nn.log_softmax(t, axis=-1)
    log_p_student = tf.nn.log_softmax(s, axis=-1)
    kl = tf.reduce_sum(tf.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
    return temperature**2 * kl


@tf.keras.utils.register_keras_serializable(package="reste_larq")
class Distiller(tf.keras.Model):
    """Wraps `student` (trained) and `teacher` (frozen); see the module docs."""

    def __init__(
        self,
        student: tf.keras.Model,
        teacher: tf.keras.Model,
        alpha: float = 1.0,
        temperature: float = 1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"distillation weight alpha must be in [0, 1] (got {alpha})")
        if not temperature > 0.0:
            raise ConfigError(f"distillation temperature must be > 0 (got {temperature})")
        if student.output_shape[-1] != teacher.output_shape[-1]:
            raise ConfigError(
                f"teacher has {teacher.output_shape[-1]} classes, the student "
                f"{student.output_shape[-1]}"
            )
        self.student = student
        self.teacher = teacher
        self.teacher.trainable = False
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.total_loss_tracker = tf.keras.metrics.Mean(name="loss")
        self.kd_loss_tracker = tf.keras.metrics.Mean(name="kd_loss")

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    @property
    def metrics(self):
        # Reset by Keras at each epoch's start like the compiled metrics. The compiled
        # loss's own tracker (the CE term alone) would shadow "loss": left out.
        compiled = [m for m in super().metrics if m.name != "loss"]
        return [self.total_loss_tracker, self.kd_loss_tracker, *compiled]

    def loss_value(self, y, student_logits, teacher_logits):
        """The distillation loss of one batch, scaled for the distribution strategy
        as Keras scales its own losses; returns (total, kd term)."""
        kd = tf.nn.compute_average_loss(
            distillation_kl(teacher_logits, student_logits, self.temperature)
        )
        total = self.alpha * kd
        if self.alpha < 1.0:
            ce = self.compiled_loss(y, student_logits)
            total = total + (1.0 - self.alpha) * ce
        regularization = self.student.losses
        if regularization:
            total = total + tf.nn.scale_regularization_loss(tf.add_n(regularization))
        return total, kd

    def train_step(self, data):
        x, y = data[0], data[1]
        teacher_logits = tf.stop_gradient(self.teacher(x, training=False))
        with tf.GradientTape() as tape:
            student_logits = self.student(x, training=True)
            total, kd = self.loss_value(y, student_logits, teacher_logits)
        variables = self.student.trainable_variables
        self.optimizer.minimize(total, variables, tape=tape)
        self.compiled_metrics.update_state(y, student_logits)
        strategy_replicas = tf.distribute.get_strategy().num_replicas_in_sync
        # the trackers report per-batch means, undoing the per-replica scaling
        self.total_loss_tracker.update_state(total * strategy_replicas)
        self.kd_loss_tracker.update_state(kd * strategy_replicas)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        x, y = data[0], data[1]
        logits = self.student(x, training=False)
        loss = self.compiled_loss(y, logits, regularization_losses=self.student.losses)
        # Keras scaled the compiled loss by 1 / replicas (it sums over replicas when it
        # applies gradients): the tracker reports the per-batch mean, as train_step does.
        self.total_loss_tracker.update_state(
            loss * tf.distribute.get_strategy().num_replicas_in_sync
        )
        self.compiled_metrics.update_state(y, logits)
        return {m.name: m.result() for m in self.metrics if m.name != "kd_loss"}

    def get_config(self):
        return {
            "student": tf.keras.layers.serialize(self.student),
            "teacher": tf.keras.layers.serialize(self.teacher),
            "alpha": self.alpha,
            "temperature": self.temperature,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["student"] = tf.keras.layers.deserialize(config["student"])
        config["teacher"] = tf.keras.layers.deserialize(config["teacher"])
        return cls(**config)
