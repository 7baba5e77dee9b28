"""The run folder: its states, their transitions, and the only code that writes it.

```
results_dir/name/
  args.json          the RunConfig (written when training starts)
  checkpoint/        model + optimizer + progress after each finished epoch (the last one)
  state.json         the same progress for people (epoch, best test top-1)
  history.csv        one row per epoch (written before that epoch's checkpoint)
  logs/              TensorBoard
  best.weights.h5    the weights of the best test top-1 so far
  final.weights.h5   the last epoch's weights (a teacher's, for --teacher)
  model.tflite       the LCE flatbuffer          (export)
  model.packed.npz   1 bit per binary weight     (export_packed)
  metrics.json       written last: the run is finished
```

States, read from the files: NEW (no folder, or an empty one) -> STARTED (args.json,
no checkpoint: killed before its first epoch ended) -> CHECKPOINTED (a checkpoint, no
metrics.json: killed, or diverged, later) -> FINISHED (metrics.json). `decide` says
what a configuration may do with the folder: start it (NEW; STARTED again, with the
same run-defining settings), resume it (CHECKPOINTED, with resume or auto_resume),
nothing (FINISHED with auto_resume); anything else is a `RunError` naming the way out.

Every write is atomic (a temporary file renamed), so a kill at any point leaves the
folder in one of the states above; `reste_larq.experiment.Experiment` then continues
from it with the same command and ends where an uninterrupted run ends
(tests/test_fault_injection.py kills it at each point with SIGKILL).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import tensorflow as tf

from reste_larq import export
from reste_larq.config import RunConfig
from reste_larq.errors import RunError

NEW, STARTED, CHECKPOINTED, FINISHED = "new", "started", "checkpointed", "finished"
START, RESUME = "start", "resume"  # decide()'s verdicts besides FINISHED

_clock = time.perf_counter  # train_seconds' clock (tests replace it)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(path, data):
    export.write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


class RunFolder:
    """One run's folder (`RunConfig.run_dir()`); see the module docs."""

    def __init__(self, path: str):
        self.path = path

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def checkpoint_dir(self) -> str:
        return self.file("checkpoint")

    def latest_checkpoint(self) -> str | None:
        if not os.path.isdir(self.checkpoint_dir):
            return None
        return tf.train.latest_checkpoint(self.checkpoint_dir)

    def state(self) -> str:
        if os.path.isfile(self.file("metrics.json")):
            return FINISHED
        if self.latest_checkpoint() is not None:
            return CHECKPOINTED
        if os.path.isfile(self.file("args.json")):
            return STARTED
        return NEW

    def saved_config(self) -> RunConfig:
        return RunConfig.from_json(read_json(self.file("args.json")))

    def _same_run(self, config: RunConfig):
        changed = config.changed(self.saved_config().resolved())
        if changed:
            raise RunError("--resume with different settings: " + ", ".join(changed))

    def decide(self, config: RunConfig) -> str:
        """START, RESUME or FINISHED (auto_resume of a finished run: nothing to do) for
        `config` (resolved); a RunError when the folder does not allow what it asks.
        Writes nothing. A run killed before its first checkpoint is started again by
        the same configuration, with or without resume."""
        state = self.state()
        if state == FINISHED:
            if config.auto_resume:
                return FINISHED
            if config.resume:
                raise RunError(
                    f"{self.path} holds a finished run (metrics.json); --evaluate it, or "
                    "--name/--results-dir for a new one"
                )
        elif state == CHECKPOINTED and (config.resume or config.auto_resume):
            self._same_run(config)
            return RESUME
        elif state == STARTED:
            self._same_run(config)  # killed before its first checkpoint: start again
            return START
        if config.resume:
            raise RunError(f"--resume: no run in {self.path}; start the run without --resume")
        if os.path.exists(self.path) and os.listdir(self.path):
            raise RunError(
                f"{self.path} already holds a run; pass --resume to continue it, or "
                "--name/--results-dir for a new one"
            )
        return START

    def write_config(self, config: RunConfig):
        write_json(self.file("args.json"), config.to_json())

    def write_metrics(self, metrics: dict):
        """The last write of a run: from now on it is FINISHED."""
        write_json(self.file("metrics.json"), metrics)

    def cut_history(self, first_epoch: int):
        """Keep history.csv's rows of the epochs before `first_epoch` (the checkpoint's):
        a row written before a kill that lost its checkpoint is trained, and written,
        again (as is a row the kill cut short)."""
        path = self.file("history.csv")
        if not os.path.isfile(path):
            return
        with open(path, "rb") as f:
            lines = f.read().splitlines(keepends=True)

        def before(line):
            epoch = line.split(b",", 1)[0]
            return line.endswith(b"\n") and epoch.isdigit() and int(epoch) < first_epoch

        kept = lines[:1] + [line for line in lines[1:] if before(line)]
        if kept != lines:
            export.write_atomic(path, b"".join(kept))

    def diverged_message(self, epoch: int | None, lr: float) -> str:
        """One line: where training diverged, the last finite checkpoint, and the
        command that continues from it with a lower learning rate."""
        last = self.latest_checkpoint()
        where = f"training diverged (NaN loss) in epoch {epoch}; see {self.path}/history.csv"
        if last is None:
            return f"{where}; no epoch finished with finite weights: start again with a lower --lr"
        return (
            f"{where}; the last finite checkpoint is {last} (epoch {last.rsplit('-', 1)[-1]}): "
            f"continue from it in a new run with a lower rate, e.g. --init-from {self.path} "
            f"--lr {lr / 10:g} --name NEW_NAME"
        )


class Progress:
    """What a checkpoint holds besides model and optimizer, saved with the weights it
    describes: the epochs done, the best test top-1 (%) and its 1-based epoch, and
    `train_seconds` (the training time of every epoch up to the checkpoint, summed over
    the processes of a resumed run; an epoch a kill lost is trained, and counted, again)."""

    def __init__(self):
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.train_seconds = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        self.best = tf.Variable([-1.0, -1.0], dtype=tf.float64, trainable=False)

    def checkpoint(self, **objects) -> tf.train.Checkpoint:
        return tf.train.Checkpoint(
            **objects, epoch=self.epoch, train_seconds=self.train_seconds, best=self.best
        )

    def best_dict(self, folder: RunFolder | None = None) -> dict:
        top1, epoch = self.best.numpy()
        if epoch >= 0:
            return {"best_test_top1": float(top1), "best_epoch": int(epoch)}
        state = folder.file("state.json") if folder else None
        if state and os.path.isfile(state):  # a run folder from before Progress.best
            saved = read_json(state)
            return {"best_test_top1": saved["best_test_top1"], "best_epoch": saved["best_epoch"]}
        return {"best_test_top1": 0.0, "best_epoch": 0}


class EpochState(tf.keras.callbacks.Callback):
    """After each finite epoch: the checkpoint (model, optimizer, `Progress`), then
    state.json (the same progress, for people: written after the checkpoint, it may lag
    one epoch behind it after a kill, never run ahead). Put it after the CSVLogger:
    the epoch's history.csv row is written before its checkpoint, and
    `RunFolder.cut_history` removes it again if the checkpoint is lost.

    A NaN epoch (TerminateOnNaN stops the batch loop, yet Keras still ends the epoch)
    is not saved: max_to_keep=1 would delete the last finite checkpoint."""

    def __init__(self, checkpoint_dir, checkpoint, progress: Progress, best: dict):
        super().__init__()
        self.manager = tf.train.CheckpointManager(checkpoint, checkpoint_dir, max_to_keep=1)
        self.progress = progress
        self.best = best
        self.state_path = os.path.join(os.path.dirname(checkpoint_dir), "state.json")
        self.train_seconds = float(progress.train_seconds.numpy())  # the restored value
        self._clock = _clock
        self._since = None

    diverged_epoch = None  # 1-based: the epoch whose loss was not finite

    def on_train_begin(self, logs=None):
        self._since = self._clock()

    def elapsed(self) -> float:
        """train_seconds so far: earlier processes' epochs plus this process's fit."""
        if self._since is None:
            return self.train_seconds
        return self.train_seconds + self._clock() - self._since

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if self.model.stop_training or (loss is not None and not np.isfinite(loss)):
            self.diverged_epoch = epoch + 1
            return
        top1 = 100.0 * float((logs or {}).get("val_accuracy", 0.0))
        if top1 > self.best["best_test_top1"]:
            self.best.update(best_test_top1=round(top1, 4), best_epoch=epoch + 1)
        self.progress.best.assign([self.best["best_test_top1"], self.best["best_epoch"]])
        self.progress.epoch.assign(epoch + 1)
        self.progress.train_seconds.assign(self.elapsed())
        self.manager.save(checkpoint_number=epoch + 1)
        write_json(self.state_path, {"epoch": epoch + 1, **self.best})
