"""TensorFlow as this package needs it: with Keras 2 as `tf.keras`, and quiet.

Larq is written for Keras 2. From TensorFlow 2.16 on, `tf.keras` is Keras 3 unless the
`tf-keras` package is installed and `TF_USE_LEGACY_KERAS=1` is set before TensorFlow is
imported (it decides then). `import reste_larq` sets it before importing
TensorFlow, so users export nothing; where TensorFlow was imported before `reste_larq`
with Keras 3, the import stops with an `ImportError` (`KerasVersionError`) that says what
to do.

Importing TensorFlow prints C++ log lines (CUDA plugin registration on a machine without
GPUs, "computation placer already registered", CPU feature notes) that no log level
reaches: they are written before TensorFlow's logging starts. Unless the user set
`TF_CPP_MIN_LOG_LEVEL` below 2 (which asks for them), the import here sets it to 2 (drop
TensorFlow's INFO and WARNING logs, keep errors) and drops the import's C++ lines below
that level; anything else the import writes to stderr is passed on. XLA's and the
runtime's absl logging ignore the variable later on too: the command lines call
`filter_cpp_logs` for the whole process.

On TensorFlow 2.19 the import also selects XLA's previous CPU runtime through
`XLA_FLAGS` (see `XLA_CPU_RUNTIME`), unless the user's `XLA_FLAGS` choose one.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import importlib.util
import os
import re
import sys
import tempfile
import threading

LEGACY_KERAS = "TF_USE_LEGACY_KERAS"
XLA_FLAGS = "XLA_FLAGS"
# XLA's CPU runtime. The estimators' backward passes (and the one-padded convs' border
# sums) are small XLA functions inside TensorFlow's graph. XLA's newer "thunk" runtime,
# the default in TensorFlow 2.19, ran them up to half as fast as the previous one on
# this project's 2-core machine, and ReSTE's whole training step 6 % slower
# (benchmarks/train_throughput.py --xla-cpu-runtimes; docs/stack.md). The flag does
# not exist before TensorFlow 2.17, where XLA would abort on it: set for 2.19 only.
XLA_CPU_RUNTIME = "--xla_cpu_use_thunk_runtime=false"
LOG_LEVEL = "TF_CPP_MIN_LOG_LEVEL"
SUPPORTED = "TensorFlow 2.19 with tf-keras 2.19 (pip install -r requirements.txt)"

# A C++ log line: absl's "W0000 00:00:1796173230.454659    2831 file.cc:177] ..." or
# TensorFlow's "2026-12-02 01:00:58.641323: E external/.../file.cc:467] ...". Group 1 or 2
# is its level (I, W, E, F).
_CPP_LOG_LINE = re.compile(
    rb"^(?:([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\]"
    rb"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: ([IWEF]) \S+:\d+\])"
)
# Lines of TensorFlow's start-up that are not about the user's work: absl's notice that
# lines precede its initialization, the CPU-feature note's second line, and the CUDA
# plugins' errors on a machine without a GPU driver (logged at level E).
_START_UP_NOISE = re.compile(
    rb"^(?:WARNING: All log messages before absl::InitializeLog\(\) is called"
    rb"|To enable the following instructions: .* rebuild TensorFlow)"
    rb"|(?:Unable to register cu\w+ factory|failed call to cuInit)"
)
_LEVELS = b"IWEF"


def _log_level() -> int:
    """TF_CPP_MIN_LOG_LEVEL as TensorFlow reads it (0: all, 1: no INFO, 2: no WARNING,
    3: no ERROR); 2 where it is not set (this package's default)."""
    level = os.environ.get(LOG_LEVEL, "").strip()
    return int(level) if level.isdigit() else 2


def _keep(line: bytes, level: int) -> bool:
    """Whether a line of file descriptor 2 passes at `level` (see `_log_level`)."""
    if level < 2:
        return True  # the user asked for TensorFlow's logs
    match = _CPP_LOG_LINE.match(line)
    if match:
        severity = _LEVELS.index(match.group(1) or match.group(2))
        return severity >= level and not _START_UP_NOISE.search(line)
    return not _START_UP_NOISE.search(line)


class KerasVersionError(ImportError):
    """`tf.keras` is not Keras 2 in this process, so Larq cannot work."""


def _import_dropping_cpp_logs(level: int):
    """`import tensorflow` (and its device discovery, where CUDA reports a missing
    driver) with file descriptor 2 in a temporary file; the lines that pass `level` are
    written to stderr afterwards."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = b"".join(line for line in capture if _keep(line, level))
            if kept:
                sys.stderr.write(kept.decode(errors="replace"))
                sys.stderr.flush()


def filter_cpp_logs():
    """For the command lines: from now on, C++ lines written to file descriptor 2 that
    do not pass TF_CPP_MIN_LOG_LEVEL (XLA's and the runtime's absl logging ignores it)
    are dropped. Python's `sys.stderr` keeps writing to the terminal directly, so no
    Python message waits on the filter; the filter drains at exit."""
    level = _log_level()
    if level < 2:
        return
    sys.stderr.flush()
    terminal = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stderr = os.fdopen(os.dup(terminal), "w", buffering=1, errors="backslashreplace")

    def forward():
        with os.fdopen(read_end, "rb") as lines:
            for line in lines:
                if _keep(line, level):
                    os.write(terminal, line)

    thread = threading.Thread(target=forward, name="filter_cpp_logs", daemon=True)
    thread.start()

    def drain():
        os.dup2(terminal, 2)  # closes the pipe's last write end: the thread sees EOF
        thread.join(timeout=5)

    atexit.register(drain)


def is_keras2(keras_module) -> bool:
    """Whether a `tf.keras` is Keras 2: tf-keras (`tf_keras.src.engine...`) or the
    `keras` 2.x of TensorFlow <= 2.15 (`keras.src.engine...`); Keras 3 has no engine."""
    module = keras_module.Model.__module__
    return module.startswith(("tf_keras.", "keras.src.engine.", "keras.engine."))


def _choose_xla_cpu_runtime():
    """XLA_FLAGS gets XLA_CPU_RUNTIME where TensorFlow 2.19 is installed and the user's
    XLA_FLAGS do not choose the runtime themselves (read when XLA first compiles)."""
    flags = os.environ.get(XLA_FLAGS, "")
    if "xla_cpu_use_thunk_runtime" in flags:
        return
    versions = []
    for distribution in ("tensorflow", "tensorflow-cpu"):
        try:
            versions.append(importlib.metadata.version(distribution))
        except importlib.metadata.PackageNotFoundError:
            pass
    if versions and all(v.startswith("2.19.") for v in versions):
        os.environ[XLA_FLAGS] = f"{flags} {XLA_CPU_RUNTIME}".strip()


def import_tensorflow():
    """TensorFlow with Keras 2 as `tf.keras` (see the module docstring); returns `tf`."""
    imported = "tensorflow" in sys.modules
    if not imported:
        # Read by TensorFlow's import. Only where tf-keras is installed: TensorFlow 2.15
        # (whose tf.keras is Keras 2 anyway) would look for it too and fail.
        if importlib.util.find_spec("tf_keras") is not None:
            os.environ[LEGACY_KERAS] = "1"
        _choose_xla_cpu_runtime()
        level = _log_level()
        os.environ[LOG_LEVEL] = str(level)
        if level >= 2:
            _import_dropping_cpp_logs(level)
    import tensorflow as tf

    # Imported before this: TensorFlow >= 2.16 took Keras 3 unless the variable was set
    # (its `tensorflow.keras.*` paths and an eager import of Keras' optimizers follow it),
    # and so does `tf.keras` when it loads, at its first use.
    try:
        keras2 = is_keras2(tf.keras)
    except ImportError as error:
        raise KerasVersionError(
            f"reste_larq needs Keras 2 as tf.keras: install tf-keras of TensorFlow's "
            f"minor version (TensorFlow {tf.__version__}; this project uses {SUPPORTED})"
        ) from error
    if not keras2:
        raise KerasVersionError(
            "reste_larq needs Keras 2, but TensorFlow was imported before it with Keras 3 "
            "as tf.keras: import reste_larq before tensorflow and larq, or set "
            f"{LEGACY_KERAS}=1 in the environment before Python starts"
        )
    return tf
