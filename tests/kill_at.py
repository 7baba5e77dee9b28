"""`python -m tests.kill_at POINT CLI-ARGS...`: run `python -m train.cifar CLI-ARGS` and
SIGKILL this process at POINT, as a preempted machine would (no exception handler, no
`finally`, no flush runs). The fault-injection test restarts the same command after it.

POINT: before_first_checkpoint (args.json written, epoch 1 begins), inside_epoch (after
the 2nd batch of the 2nd epoch), between_checkpoint_and_state (the 2nd epoch's checkpoint
saved, its state.json not yet), during_export (the LCE conversion begins).
"""

import os
import signal
import sys

from reste_larq import callbacks as cb  # noqa: E402  (first: Keras 2 as tf.keras)
from reste_larq import export, rundir
from train import cifar


def die(*_, **__):
    os.kill(os.getpid(), signal.SIGKILL)


def main(point, argv):
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
    elif point == "during_export":
        export.convert = die
    else:
        sys.exit(f"unknown point {point}")
    return cifar.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
