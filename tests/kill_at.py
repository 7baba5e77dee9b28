"""`python -m tests.kill_at POINT CLI-ARGS...`: run `python -m train.cifar CLI-ARGS` and
SIGKILL this process at POINT, as a preempted machine would (no exception handler, no
`finally`, no flush runs). The fault-injection test restarts the same command after it.

POINT: before_first_checkpoint (args.json written, epoch 1 begins), inside_epoch (after
the 2nd batch of the 2nd epoch), between_checkpoint_and_state (the 2nd epoch's checkpoint
saved, its state.json not yet), third_epoch_begins, during_export (the LCE conversion
begins), export_raises (the conversion raises RuntimeError), export_hangs (it sleeps 10
minutes), count_decodes (KILL_AT_DECODE_LOG.PID gets a line per ImageNet image decoded),
nowhere (the run as it is).

KILL_AT_CLI=imagenet runs `train.imagenet` instead, and KILL_AT_MOCK_EXAMPLES=N inside
`tfds.testing.mock_data(num_examples=N)`. KILL_AT_DIGEST_LOG=PREFIX writes "name sha256"
per weight to PREFIX.PID when the run digests its final weights (to name the weights two
workers disagree on).
"""

import os
import signal
import sys

from reste_larq import callbacks as cb  # noqa: E402  (first: Keras 2 as tf.keras)
from reste_larq import export, rundir
from train import cifar, imagenet


def die(*_, **__):
    os.kill(os.getpid(), signal.SIGKILL)


def count_decodes(prefix):
    """Append "epoch position" to prefix.PID for every ImageNet training image decoded."""
    import tensorflow as tf

    from reste_larq import data

    decode = data._imagenet_train_image
    path = f"{prefix}.{os.getpid()}"

    def log(seed):
        with open(path, "a") as f:
            f.write(f"{seed[0].numpy() % 1000003} {seed[1].numpy()}\n")
        return 0

    def counted(encoded, seed, *args):
        logged = tf.py_function(log, [seed], tf.int32)
        with tf.control_dependencies([logged]):
            return tf.identity(decode(encoded, seed, *args))

    data._imagenet_train_image = counted


def log_weight_digests(prefix):
    """Write each weight's sha256 to prefix.PID whenever the run digests its weights."""
    import hashlib

    import numpy as np

    from reste_larq import distribute

    whole = distribute.weights_digest

    def digest(model):
        with open(f"{prefix}.{os.getpid()}", "w") as f:
            for w in model.weights:
                data = np.ascontiguousarray(w.numpy()).tobytes()
                f.write(f"{w.name} {hashlib.sha256(data).hexdigest()}\n")
        return whole(model)

    distribute.weights_digest = digest


def main(point, argv):
    if os.environ.get("KILL_AT_DIGEST_LOG"):
        log_weight_digests(os.environ["KILL_AT_DIGEST_LOG"])
    if point == "before_first_checkpoint":
        cb.LearningRateSchedule.on_epoch_begin = die
    elif point == "inside_epoch":
        begin = cb.LearningRateSchedule.on_epoch_begin

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch_now = epoch
            begin(self, epoch, logs)

        def on_train_batch_end(self, batch, logs=None):
            if self.epoch_now == 1 and batch == 1:
                die()

        cb.LearningRateSchedule.on_epoch_begin = on_epoch_begin
        cb.LearningRateSchedule.on_train_batch_end = on_train_batch_end
    elif point == "between_checkpoint_and_state":
        write_json = rundir.write_json

        def _write_json(path, data):
            if path.endswith("state.json") and data.get("epoch") == 2:
                die()
            write_json(path, data)

        rundir.write_json = _write_json
    elif point == "third_epoch_begins":
        begin = cb.LearningRateSchedule.on_epoch_begin

        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                die()
            begin(self, epoch, logs)

        cb.LearningRateSchedule.on_epoch_begin = on_epoch_begin
    elif point == "during_export":
        export.convert = die
    elif point == "export_hangs":

        def convert(*_, **__):
            import time

            time.sleep(600)

        export.convert = convert
    elif point == "export_raises":

        def convert(*_, **__):
            raise RuntimeError("simulated export failure")

        export.convert = convert
    elif point == "count_decodes":
        count_decodes(os.environ["KILL_AT_DECODE_LOG"])
    elif point != "nowhere":
        sys.exit(f"unknown point {point}")
    cli = {"cifar": cifar, "imagenet": imagenet}[os.environ.get("KILL_AT_CLI", "cifar")]
    if os.environ.get("KILL_AT_MOCK_EXAMPLES"):
        import tensorflow_datasets as tfds

        with tfds.testing.mock_data(num_examples=int(os.environ["KILL_AT_MOCK_EXAMPLES"])):
            return cli.main(argv)
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
