"""A training run from a `RunConfig`: data -> model (and teacher) -> compile -> fit
(callbacks) -> evaluate (Keras) -> export (LCE, evaluated with LCE's interpreter),
in a run folder that a killed run continues from (`reste_larq.rundir`).

What `python -m train.cifar` and `python -m train.imagenet` run, for Python users:

```python
from reste_larq.config import RunConfig
from reste_larq.experiment import Experiment

config = RunConfig(dataset="fashion_mnist", epochs=2, batch_size=128,
                   results_dir="results", name="fmnist_reste", auto_resume=True)
metrics = Experiment(config).run()   # run it again after a kill: it continues
print(metrics["test_top1"], metrics["tflite_test_top1"])
Experiment(config).evaluate("results/fmnist_reste")   # the checkpoint, re-evaluated
```

`run()` returns what it writes to metrics.json. Expected failures (a bad value, a run
folder that does not allow what was asked, missing data) raise the library's errors
(`ConfigError`, `RunError`, `DataNotFoundError`, `DataFormatError`), whose message is
one line that says what to do.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import tensorflow as tf

from reste_larq import callbacks as cb
from reste_larq import data as data_lib
from reste_larq import distribute, export, models, native, provenance, rundir, training
from reste_larq.config import PRECISION_CHOICES, PRECISION_POLICIES, RunConfig
from reste_larq.distill import Distiller
from reste_larq.errors import ConfigError, DataFormatError, DataNotFoundError, RunError

PACKED_FILE = "model.packed.npz"
# What refuses a run before anything is written (one line each, exit 2 in the CLIs).
REFUSALS = (RunError, ConfigError, DataNotFoundError, DataFormatError)
PER_EPOCH_COLUMNS = ("epoch", "lr", "o", "mu", "tau", "frozen_fraction", "loss", "val_accuracy")


# --------------------------------------------------------------------------- data
class Data:
    """What a training run needs from its data source."""

    def __init__(
        self, num_classes, input_shape, eval_ds, make_train=None, indicator_batch=None, source=None
    ):
        self.source = source  # where the data came from, for the log and metrics.json
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self.eval_ds = eval_ds
        self.make_train = make_train  # first_epoch -> (dataset, steps_per_epoch)
        self.indicator_batch = indicator_batch  # () -> (images, labels), called if needed


def small_image_data(config: RunConfig, train: bool = True) -> Data:
    """CIFAR-10/100, (Fashion-)MNIST: the official offline files or TFDS
    (`data.load_arrays`), the ReSTE reference's augmentation (`data.train_dataset`)."""
    info = data_lib.with_mean_std(data_lib.info(config.dataset), config.mean_std)
    test_x, test_y, source = data_lib.load_arrays(
        config.dataset, "test", config.data_dir, config.download, return_source=True
    )
    if config.test_limit:
        test_x, test_y = test_x[: config.test_limit], test_y[: config.test_limit]
    eval_ds = data_lib.eval_dataset(test_x, test_y, info, config.batch_size_test)
    if not train:
        return Data(info.num_classes, test_x.shape[1:], eval_ds, source=source)
    train_x, train_y = data_lib.load_arrays(
        config.dataset, "train", config.data_dir, config.download
    )
    if config.train_limit:
        train_x, train_y = train_x[: config.train_limit], train_y[: config.train_limit]

    def make_train(first_epoch):
        return data_lib.train_dataset(
            train_x,
            train_y,
            info,
            config.batch_size,
            config.seed,
            first_epoch,
            config.epochs,
            pad_mode=config.crop_padding,
            rotate=config.rotate,
            mixup=config.mixup,
        )

    batch = min(config.batch_size, len(train_x))
    return Data(
        info.num_classes,
        train_x.shape[1:],
        eval_ds,
        make_train,
        lambda: (data_lib.normalize(train_x[:batch], info), train_y[:batch]),
        source=source,
    )


def imagenet_data(config: RunConfig, train: bool = True) -> Data:
    """ImageNet from TFDS's prepared `imagenet2012` in `config.data_dir`."""
    info = data_lib.info(config.dataset)
    eval_ds = data_lib.imagenet_eval_dataset(
        config.data_dir, config.batch_size_test, download=config.download, limit=config.test_limit
    )
    where = config.data_dir or data_lib._tfds_data_dir()
    source = f"tensorflow-datasets imagenet2012 (data_dir {where})"
    if not train:
        return Data(info.num_classes, info.image_shape, eval_ds, source=source)

    def train_dataset(first_epoch, input_context=None):
        return data_lib.imagenet_train_dataset(
            config.data_dir,
            config.batch_size,
            config.seed,
            first_epoch,
            config.epochs,
            download=config.download,
            limit=config.train_limit,
            shuffle_buffer=config.shuffle_buffer,
            color_jitter=config.color_jitter,
            lighting=config.lighting,
            input_context=input_context,
        )

    def make_train(first_epoch):
        if config.strategy != "multi_worker":
            return train_dataset(first_epoch)
        # Each worker reads and decodes its own share of every epoch (see
        # imagenet_train_dataset); Keras' own distribution would shard the decoded
        # images instead (AUTO falls back to DATA behind the epochs' flat_map): every
        # worker would decode the whole epoch and keep its share.
        n = data_lib.imagenet_train_count(
            config.data_dir, download=config.download, limit=config.train_limit
        )
        steps = data_lib.sharded_steps(n, config.batch_size)
        creator = tf.keras.utils.experimental.DatasetCreator(
            lambda input_context: train_dataset(first_epoch, input_context)[0]
        )
        return creator, steps

    train_dataset(0)  # a missing or empty train split fails here, before anything is written
    return Data(
        info.num_classes,
        info.image_shape,
        eval_ds,
        make_train,
        # only indicators pull a batch (the first of epoch 0)
        lambda: next(iter(train_dataset(0)[0])),
        source=source,
    )


def default_data(config: RunConfig, train: bool = True) -> Data:
    """imagenet_data for imagenet2012, small_image_data for the others."""
    if config.dataset == "imagenet2012":
        return imagenet_data(config, train)
    return small_image_data(config, train)


# ---------------------------------------------------------------------- pieces
def check(config: RunConfig):
    """Every value check that needs no file: raises before anything is written."""
    if config.o_end < 1:
        raise ConfigError(f"--o-end must be >= 1 (got {config.o_end})")
    if not config.barrier_timeout > 0:  # also NaN
        raise ConfigError(f"--barrier-timeout must be > 0 s (got {config.barrier_timeout})")
    if config.warmup < 0 or (config.warmup and config.warmup >= config.epochs):
        raise ConfigError(f"--warmup must be in [0, epochs) (got {config.warmup})")
    if config.label_smoothing >= 1:
        raise ConfigError(f"--label-smoothing must be < 1 (got {config.label_smoothing})")
    if config.w32 and (config.a32 or models.info(config.model).a32):
        raise ConfigError(
            f"--w32 keeps weights real, and {config.model} with --a32 or by default keeps "
            "activations real: nothing would be binary (use --quantizer float)"
        )
    if config.block != "reference" and not models.info(config.model).blocks:
        raise ConfigError(
            f"--block {config.block}: {config.model} has its own block; --block is for "
            + ", ".join(n for n in models.available() if models.info(n).blocks)
        )
    if config.downsample != "reference" and not models.info(config.model).downsamples:
        raise ConfigError(
            f"--downsample {config.downsample}: {config.model} has no 1x1 conv downsample; "
            "--downsample is for "
            + ", ".join(n for n in models.available() if models.info(n).downsamples)
        )
    # a grayscale dataset with RGB statistics fails here
    data_lib.with_mean_std(data_lib.info(config.dataset), config.mean_std)
    if not 0.0 <= config.distill_weight <= 1.0:
        raise ConfigError(f"--distill-weight must be in [0, 1] (got {config.distill_weight})")
    if not 0.0 <= config.bn_momentum < 1.0:
        raise ConfigError(f"--bn-momentum must be in [0, 1) (got {config.bn_momentum})")
    if config.mixed_precision not in PRECISION_POLICIES:
        raise ConfigError(
            f"mixed_precision must be one of {', '.join(PRECISION_CHOICES)} "
            f"(got {config.mixed_precision!r})"
        )
    learning_rate_schedule(config)  # bad schedule values fail here


def build_model(config: RunConfig, num_classes, input_shape):
    return models.build(
        config.model,
        quantizer=config.quantizer,
        input_shape=input_shape,
        num_classes=num_classes,
        a32=True if config.a32 else None,
        w32=config.w32,
        padding=config.padding,
        sync_bn=config.strategy != "default",
        bn_momentum=config.bn_momentum,
        block=config.block,
        downsample=config.downsample,
    )


def init_weights(model, twin, checkpoint_path, distilled=False):
    """Load another run's weights into `model`, and nothing of its optimizer.

    Restored by object graph into `twin` (an uncompiled model of model's architecture),
    not by weight list: a 1W32A run has no activation quantizers, so its list differs.
    Not into `model` itself: a compiled Keras model tracks its optimizer, and restoring
    it would also restore the other run's SGD velocity (which carries its lr).
    Every weight must come from the checkpoint (`training.restore_weights`).
    distilled: the other run checkpointed a Distiller (its student under model/student)."""
    training.restore_weights(twin, checkpoint_path, distilled=distilled)
    model.set_weights(twin.get_weights())


def learning_rate_schedule(config: RunConfig) -> cb.LearningRateSchedule:
    try:
        return cb.LearningRateSchedule(
            config.lr,
            config.epochs,
            config.warmup,
            config.lr_schedule,
            steps=config.lr_steps or (),
            gamma=config.lr_gamma,
            restart_period=config.sgdr_period,
            restart_mult=config.sgdr_mult,
            min_lr=config.lr_min,
        )
    except ConfigError as error:
        raise ConfigError(f"--lr-schedule {config.lr_schedule}: {error}") from None


def estimator_schedule(config: RunConfig) -> cb.EstimatorSchedule:
    """The run's o / mu schedule: training, resume and evaluation all use this one."""
    return cb.EstimatorSchedule(
        config.epochs, o_end=config.o_end, mu_start=config.mu_start, mu_end=config.mu_end
    )


def teacher_config(config: RunConfig) -> RunConfig | None:
    """config.teacher's configuration (to build its model), checked before anything is
    written; None without a teacher."""
    if not config.teacher:
        return None
    folder = rundir.RunFolder(config.teacher)
    if not os.path.isfile(folder.file("args.json")):
        raise RunError(
            f"--teacher: {config.teacher} is not a run folder of this project (no args.json)"
        )
    if not os.path.isfile(folder.file("final.weights.h5")):
        raise RunError(f"--teacher: {config.teacher} has no final.weights.h5 (not finished?)")
    saved = folder.saved_config()
    # The teacher's logits are a target only for the images it learned from, normalized
    # as it saw them: same dataset (MNIST and Fashion-MNIST share classes and shape),
    # same mean/std.
    if saved.dataset != config.dataset:
        raise RunError(
            f"--teacher: {config.teacher} was trained on {saved.dataset}; this run "
            f"trains on {config.dataset}: distill from a teacher of the same dataset"
        )
    ours = data_lib.with_mean_std(data_lib.info(config.dataset), config.mean_std)
    theirs = data_lib.with_mean_std(data_lib.info(config.dataset), saved.mean_std)
    if (ours.mean, ours.std) != (theirs.mean, theirs.std):
        raise RunError(
            f"--teacher: {config.teacher} was trained with --mean-std {saved.mean_std} "
            f"and this run normalizes with --mean-std {config.mean_std}: the teacher would "
            f"see other inputs (pass --mean-std {saved.mean_std})"
        )
    return dataclasses.replace(saved, strategy=config.strategy)  # BN sync as the student's


def compile_model(model, config: RunConfig):
    """PyTorch's SGD (or Adam) with the reference's coupled weight decay on every
    weight, cross-entropy with optional label smoothing (`reste_larq.training`)."""
    num_classes = getattr(model, "student", model).output_shape[-1]
    model.compile(
        optimizer=training.make_optimizer(
            config.optimizer,
            config.lr,
            momentum=config.momentum,
            coupled_weight_decay=config.weight_decay,
        ),
        loss=training.sparse_cross_entropy(num_classes, config.label_smoothing),
        metrics=_metrics(num_classes, config),
        jit_compile=config.jit_compile,
    )


def _metrics(num_classes, config: RunConfig):
    if config.mixup:  # soft training labels
        return [
            training.top_k_accuracy(num_classes, 1, "accuracy"),
            training.top_k_accuracy(num_classes, 5, "top5"),
        ]
    return ["accuracy", tf.keras.metrics.SparseTopKCategoricalAccuracy(5, name="top5")]


def evaluate_keras(model, eval_ds):
    """(top1, top5) in percent with the Keras model in inference mode."""
    logits, labels = [], []
    for x, y in eval_ds:
        logits.append(model(x, training=False).numpy())
        labels.append(y.numpy())
    logits, labels = np.concatenate(logits), np.concatenate(labels)
    return export.topk_accuracy(logits, labels, 1), export.topk_accuracy(logits, labels, 5)


def per_epoch(history_csv):
    """history.csv's schedule values and frozen fraction, one dict per epoch."""
    if not os.path.isfile(history_csv):
        return []
    with open(history_csv) as f:
        rows = list(csv.DictReader(f))
    return [
        {
            k: (int(row[k]) if k == "epoch" else float(row[k]))
            for k in PER_EPOCH_COLUMNS
            if row.get(k)
        }
        for row in rows
    ]


def final_metrics(config: RunConfig, model, data: Data, schedule) -> dict:
    top1, top5 = evaluate_keras(model, data.eval_ds)
    return {
        "test_top1": round(top1, 4),
        "test_top5": round(top5, 4),
        "epochs": config.epochs,
        "quantizer": config.quantizer,
        "model": config.model,
        "dataset": config.dataset,
        "data_source": data.source,
        **({"o_final": schedule.o_at(config.epochs - 1)} if config.quantizer == "reste" else {}),
        **({"mu_final": schedule.mu_at(config.epochs - 1)} if config.quantizer == "bnnpp" else {}),
        **({"tau_final": schedule.tau_at(config.epochs - 1)} if config.quantizer == "recu" else {}),
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "args": config.to_json(),
    }


def export_and_evaluate(model, data: Data, directory=None, eval_limit=None) -> dict:
    """Convert with LCE, evaluate the flatbuffer with LCE's interpreter, and (with a
    run directory) write model.tflite."""
    # Status lines go to stderr: stdout carries the metrics JSON (--evaluate > m.json).
    print("converting to a TFLite flatbuffer with Larq Compute Engine ...", file=sys.stderr)
    flatbuffer = export.convert(model)
    if directory:
        export.write_atomic(os.path.join(directory, "model.tflite"), flatbuffer)
    ops = export.op_counts(flatbuffer)
    print(
        f"evaluating the .tflite with LCE's interpreter ({ops.get('LceBconv2d', 0)} "
        "LceBconv2d; x86 runs LCE's reference kernels, ARM its fast ones)",
        file=sys.stderr,
    )
    logits, labels = export.tflite_predictions(
        flatbuffer, data.eval_ds, limit=eval_limit, progress=True
    )
    return {
        "tflite_eval_images": len(labels),
        "tflite_test_top1": round(export.topk_accuracy(logits, labels, 1), 4),
        "tflite_test_top5": round(export.topk_accuracy(logits, labels, 5), 4),
        "tflite_bytes": len(flatbuffer),
        "tflite_lce_bconv2d": ops.get("LceBconv2d", 0),
        "binary_convs": export.count_binary_convs(model),
    }


def export_packed(model, directory) -> dict:
    """model.packed.npz (export.save_packed), written atomically."""
    path = os.path.join(directory, PACKED_FILE)
    stats = export.save_packed(model, path + ".tmp")
    os.replace(path + ".tmp", path)
    return {"packed_bytes": os.path.getsize(path), "packed_binary_kernels": stats["binary_kernels"]}


# ------------------------------------------------------------------ the experiment
class Experiment:
    """One run of `config`: `run()` trains (or resumes, or reports a finished run) and
    exports; `evaluate(path)` re-evaluates a run folder's checkpoint or packed file.

    load_data(config, train=True) -> Data; default: `default_data`."""

    def __init__(self, config: RunConfig, load_data=None):
        self.config = config.resolved()
        self.load_data = load_data or default_data

    # ------------------------------------------------------------------- train
    def run(self) -> dict:
        """Train as the configuration says; returns the metrics written to metrics.json."""
        config = self.config
        check(config)
        if config.evaluate:
            return self.evaluate(config.evaluate)
        folder = rundir.RunFolder(config.run_dir())
        multi_worker = config.strategy == "multi_worker"
        # Every check that can refuse the run writes nothing, and with several workers
        # they must all decide the same (start, resume, or refuse, with the same line)
        # before the chief writes anything: a worker that exits alone leaves the others
        # waiting in a collective. Single-process runs raise at once.
        refusal, verdict, teacher, init_checkpoint, data = None, rundir.START, None, None, None
        try:
            verdict = folder.decide(config)
            teacher = teacher_config(config)
            init_checkpoint = self._init_checkpoint()
        except REFUSALS as error:
            if not multi_worker:
                raise
            refusal = error
        if verdict == rundir.FINISHED:  # auto_resume of a finished run: report, write nothing
            print(f"{folder.path} holds a finished run: nothing to do", file=sys.stderr)
            return rundir.read_json(folder.file("metrics.json"))
        resume = verdict == rundir.RESUME

        if config.deterministic:
            # Process-wide and one-way, before TensorFlow's runtime starts (see there).
            distribute.make_deterministic()
        tf.keras.utils.set_random_seed(config.seed)
        # Before any model is built: Keras layers take the global policy when made
        # (float16 compiles with dynamic loss scaling: Keras wraps the optimizer).
        tf.keras.mixed_precision.set_global_policy(PRECISION_POLICIES[config.mixed_precision])
        strategy = distribute.make_strategy(config.strategy, config.logical_cpus)
        if refusal is None:
            try:  # after the strategy: a multi-worker strategy must come before other ops
                data = self.load_data(config)
            except REFUSALS as error:
                if not multi_worker:
                    raise
                refusal = error
        if multi_worker:
            distribute.workers_agree(
                strategy, refusal, resume, config.barrier_timeout, config.mixed_precision
            )
        chief, task = (
            distribute.worker_task() if config.strategy == "multi_worker" else (True, "chief0")
        )
        # Only the chief writes the run folder; other workers write to a temporary
        # folder of their own and delete it at the end (Keras' multi-worker guide).
        out = folder.path if chief else tempfile.mkdtemp(prefix=f"reste_larq_{task}_")
        try:
            return self._train(
                folder, rundir.RunFolder(out), strategy, resume, teacher, init_checkpoint, data
            )
        finally:
            if not chief:
                shutil.rmtree(out, ignore_errors=True)

    def _init_checkpoint(self):
        """config.init_from's latest checkpoint (None without init_from)."""
        config = self.config
        if not config.init_from:
            return None
        found = rundir.RunFolder(config.init_from).latest_checkpoint()
        if found is None or not os.path.isfile(os.path.join(config.init_from, "args.json")):
            raise RunError(
                f"--init-from: {config.init_from} is not a run folder with args.json "
                "and a checkpoint/"
            )
        return found

    def _train(self, folder, out, strategy, resume, teacher_cfg, init_checkpoint, data):
        """Train as `run` prepared: read the run's state from `folder` (the chief's),
        write this worker's files to `out`."""
        config = self.config
        chief = out.path == folder.path
        if chief and data.source:
            print(f"{config.dataset}: {data.source}", flush=True)
        if chief:
            # "auto" resolved per machine (config.auto_precision): say what it chose
            policy = PRECISION_POLICIES[config.mixed_precision]
            print(
                f"precision: {policy}"
                + ("" if policy == "float32" else " (variables float32; the .tflite float32)"),
                flush=True,
            )
            if config.quantizer != "float":
                native.ops()  # built here (once per TensorFlow), not inside the first step
                print(f"estimator backward: {native.status()}", flush=True)
        os.makedirs(out.path, exist_ok=True)
        with strategy.scope():
            model = build_model(config, data.num_classes, data.input_shape)
            student = model
            if teacher_cfg is not None:
                teacher = build_model(teacher_cfg, data.num_classes, data.input_shape)
                teacher.load_weights(os.path.join(config.teacher, "final.weights.h5"))
                model = Distiller(
                    student, teacher, config.distill_weight, config.distill_temperature
                )
            compile_model(model, config)
            progress = rundir.Progress()
            checkpoint = progress.checkpoint(model=model, optimizer=model.optimizer)

        first_epoch = 0
        best = {"best_test_top1": 0.0, "best_epoch": 0}
        if resume:
            checkpoint.restore(folder.latest_checkpoint()).expect_partial()
            first_epoch = int(progress.epoch.numpy())
            best = progress.best_dict(folder)
            if chief:
                folder.cut_history(first_epoch)
            print(f"resuming {folder.path} at epoch {first_epoch + 1}/{config.epochs}", flush=True)
        else:
            if init_checkpoint:
                self._init_from(student, data, init_checkpoint)
            out.write_config(config)

        schedule = estimator_schedule(config)
        epoch_state = rundir.EpochState(out.checkpoint_dir, checkpoint, progress, best)
        callbacks = [schedule, learning_rate_schedule(config)]
        if config.indicators:
            callbacks.append(cb.Indicators(data.indicator_batch(), o=config.o_end))
        if export.count_binary_kernels(student):
            callbacks.append(cb.FrozenFraction())
        callbacks += [
            # the epoch's row before its checkpoint: see rundir.EpochState
            tf.keras.callbacks.CSVLogger(out.file("history.csv"), append=resume),
            epoch_state,
            tf.keras.callbacks.TensorBoard(out.file("logs"), write_graph=False, profile_batch=0),
            tf.keras.callbacks.ModelCheckpoint(
                out.file("best.weights.h5"),
                monitor="val_accuracy",
                mode="max",
                save_best_only=True,
                save_weights_only=True,
                initial_value_threshold=best["best_test_top1"] / 100.0 if resume else None,
            ),
            tf.keras.callbacks.TerminateOnNaN(),
        ]

        if first_epoch < config.epochs:
            train_ds, steps = data.make_train(first_epoch)
            if chief:
                print(
                    f"training {config.model} ({config.quantizer}) on {config.dataset}: "
                    f"{config.epochs - first_epoch} epochs of {steps} steps, batch "
                    f"{config.batch_size}; run folder {folder.path}",
                    flush=True,
                )
            model.fit(
                train_ds,
                epochs=config.epochs,
                initial_epoch=first_epoch,
                steps_per_epoch=steps,
                validation_data=data.eval_ds,
                callbacks=callbacks,
                verbose=config.verbose,
            )
        train_seconds = round(epoch_state.elapsed(), 1)  # before evaluation and export
        if model.stop_training:  # only TerminateOnNaN stops a run early
            raise RunError(folder.diverged_message(epoch_state.diverged_epoch, config.lr))
        if config.strategy != "default":
            # Evaluate and export a one-device twin: synchronized BatchNorm would run
            # collectives (every worker) even in inference.
            twin = build_model(
                dataclasses.replace(config, strategy="default"),
                data.num_classes,
                data.input_shape,
            )
            twin.set_weights(student.get_weights())
            student = twin
        student.save_weights(out.file("final.weights.h5"))
        digest = distribute.weights_digest(student)
        if config.strategy == "multi_worker":  # every worker prints it: equal means in step
            print(f"final weights sha256: {digest}", flush=True)
        if not chief:
            # The chief evaluates, exports and writes metrics.json. Wait for it (a worker
            # that exits first fails the chief's coordination service), but not for ever,
            # and fail with it if it fails.
            if config.strategy == "multi_worker":
                distribute.finish_together(strategy, None, config.barrier_timeout)
            return {}
        try:
            metrics = self._finish(
                folder, out, teacher_cfg, student, data, schedule, best, train_seconds, digest
            )
        except Exception as error:
            if config.strategy == "multi_worker":  # tell the other workers, then raise
                distribute.finish_together(strategy, error, config.barrier_timeout)
            raise
        if config.strategy == "multi_worker":  # release the other workers
            distribute.finish_together(strategy, None, config.barrier_timeout)
        return metrics

    def _finish(
        self, folder, out, teacher_cfg, student, data, schedule, best, train_seconds, digest
    ):
        """The chief's evaluation, export and metrics.json."""
        config = self.config
        metrics = final_metrics(config, student, data, schedule)
        metrics.update(best)
        metrics["per_epoch"] = per_epoch(out.file("history.csv"))
        metrics["train_seconds"] = train_seconds
        metrics["weights_sha256"] = digest
        metrics["provenance"] = provenance.describe()
        metrics["deterministic"] = config.deterministic
        if teacher_cfg is not None:
            teacher_metrics = os.path.join(config.teacher, "metrics.json")
            metrics["teacher"] = config.teacher
            if os.path.isfile(teacher_metrics):
                metrics["teacher_test_top1"] = rundir.read_json(teacher_metrics).get("test_top1")
        if config.export:  # the student alone
            metrics.update(
                export_and_evaluate(student, data, folder.path, config.export_eval_limit)
            )
        if config.export_packed:
            metrics.update(export_packed(student, folder.path))
        folder.write_metrics(metrics)
        print(json.dumps({k: metrics[k] for k in metrics if k != "args"}, indent=1), flush=True)
        return metrics

    def _init_from(self, student, data, init_checkpoint):
        config = self.config
        other = rundir.read_json(os.path.join(config.init_from, "args.json"))
        try:
            init_weights(
                student,
                build_model(config, data.num_classes, data.input_shape),
                init_checkpoint,
                distilled=bool(other.get("teacher")),
            )
        except ConfigError as error:
            trained_as = " ".join(
                f"--{k.replace('_', '-')} {other[k]}"
                for k in ("model", "block", "downsample", "dataset")
                if k in other and other[k] != getattr(config, k)
            )
            raise RunError(
                f"--init-from {config.init_from}: {error}"
                + (f" (it was trained with {trained_as})" if trained_as else "")
            ) from None
        print(f"initialized from {init_checkpoint}", flush=True)

    # ---------------------------------------------------------------- evaluate
    def evaluate(self, path: str) -> dict:
        """A run folder (or its checkpoint/, or its model.packed.npz): rebuild the run's
        model from its args.json, load its latest checkpoint (or the packed file), and
        report the same metrics; this configuration's data location, test limit and
        batch, and export flags apply."""
        config = self.config
        path = path.rstrip("/")
        packed = path.endswith(".npz")
        directory = (
            os.path.dirname(path) if packed or os.path.basename(path) == "checkpoint" else path
        )
        folder = rundir.RunFolder(directory)
        if packed and not (os.path.isfile(path) and os.path.isfile(folder.file("args.json"))):
            raise RunError(
                f"--evaluate: {path} is not a packed file in a run folder with args.json"
            )
        if not packed and (
            not os.path.isfile(folder.file("args.json")) or folder.latest_checkpoint() is None
        ):
            raise RunError(f"--evaluate: {path} is not a run folder with args.json and checkpoint/")
        saved = dataclasses.replace(
            folder.saved_config().resolved(),
            evaluate=path,
            strategy="default",
            logical_cpus=None,
            data_dir=config.data_dir,
            download=config.download,
            test_limit=config.test_limit,
            batch_size_test=config.batch_size_test,
            export=config.export,
            export_eval_limit=config.export_eval_limit,
        )
        data = self.load_data(saved, train=False)
        model = build_model(saved, data.num_classes, data.input_shape)
        epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
        if packed:
            export.load_packed(path, model)
        else:
            # A distilled run checkpoints the Distiller: the student sits under model/student.
            saved_model = tf.train.Checkpoint(student=model) if saved.teacher else model
            tf.train.Checkpoint(model=saved_model, epoch=epoch_var).restore(
                folder.latest_checkpoint()
            ).expect_partial().assert_existing_objects_matched()
        metrics = final_metrics(saved, model, data, estimator_schedule(saved))
        if packed:
            metrics["evaluated_file"] = path
        else:
            metrics["evaluated_epoch"] = int(epoch_var.numpy())
        if config.export:
            metrics.update(export_and_evaluate(model, data, eval_limit=config.export_eval_limit))
        print(json.dumps({k: metrics[k] for k in metrics if k != "args"}, indent=1), flush=True)
        return metrics
