"""Native CPU kernels for the estimators' training passes, built on first use.

Five TensorFlow ops compiled from ``reste_ops.cc`` (next to this file), in float32 and
bfloat16 (float16 keeps the XLA kernels):

- ``reste_grad(x, dy, o, t=, interval=)``: ReSTE's backward, dy * g(x), within 4.3e-7
  (relative) of the XLA kernel, as close as that one is to TensorFlow's own exp and log;
- ``ste_grad(x, dy, clip)``: the STE's, Larq's clipped select, bit for bit;
- ``binary_sign(x)``: `larq.math.sign` in one pass (Larq's form makes three), bit for
  bit, in training steps only (`reste_larq.quantizers.binary_sign`): the graphs LCE
  converts keep Larq's ops;
- ``border_sums(dy, rt=, rb=, cl=, cr=)``: the one-padded convs' border gradient
  (`reste_larq.layers`), dy summed over the batch on the border strips;
- ``add_at_border(outputs, values, rt=, rb=, cl=, cr=)``: the same convs' border term
  forward, added in the convolution's output buffer (the border strips only).

`reste_larq.quantizers` and `reste_larq.layers` use them when they load, and the XLA
kernels and TensorFlow ops they replace otherwise (tests/test_native.py compares the
two).

Why: inside a training step on this 2-core CPU, an XLA function costs more than the
same memory work as a TensorFlow op. `benchmarks/train_throughput.py` variants,
resnet20_1w1a, batch 128, float32: the float twin with its binary convs' inputs
binarized by one `Sign` and one `Mul` kept 0.96-0.98 of the twin's images/s, and
0.91-0.92 with that `Mul` as an XLA function; ReSTE with its backward replaced by a
`Mul` reached 0.91 against 0.82 (docs/results.md, "Native kernels").

How it is built: ``$CXX`` (default ``g++``) with TensorFlow's own compile and link flags
(`tf.sysconfig`), ``-O3 -march=native``, into
``$RESTE_LARQ_CACHE_DIR`` (default ``~/.cache/reste_larq``)``/native/<key>/``, the key a
hash of the source, the TensorFlow version, the flags and the CPU's feature flags, so
a new TensorFlow or another CPU builds again. About 5-10 s, once; the build writes a
temporary file and renames it, so concurrent processes (pytest-xdist, two workers) do
not see half a library.

``RESTE_LARQ_NATIVE`` chooses:

- ``auto`` (default): build and load; if that fails (no compiler, no TensorFlow
  headers), log one warning naming the cause and train with the XLA kernels.
- ``1``: the same, but a failure raises `NativeKernelsError`.
- ``0``: never; the XLA kernels (e.g. for A/B measurements).

Inside a function compiled by XLA (`jit_compile=True`, the CLI's ``--jit-compile``) the
XLA kernels are traced, since XLA cannot compile a custom op. Where a GPU is visible the
XLA kernels are used whatever the setting: these kernels
are CPU-only (untested on a GPU machine: there is none here).

A SavedModel (`tf.saved_model.save`, Keras' ``model.save`` in the TF format) traces the
gradient functions it stores with the XLA kernels, so it loads in any TensorFlow.

    from reste_larq import native
    native.ops()      # the kernels, building them if needed; None where unavailable
    native.status()   # e.g. "native kernels"
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading

import tensorflow as tf
from tensorflow.python.ops import control_flow_util
from tensorflow.python.saved_model import save_context

from reste_larq.errors import ConfigError

__all__ = ["DTYPES", "NativeKernelsError", "SOURCE", "build", "mode", "ops", "ops_for", "status"]

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reste_ops.cc")
MODES = ("auto", "0", "1")
DTYPES = (tf.float32, tf.bfloat16)  # the kernels' dtypes
_BUILD_TIMEOUT_S = 600
# -fno-trapping-math: without it GCC keeps the loops' conditional float operations as
# branches where a CPU has no AVX-512 masks (AVX2: ReSTE's loop stayed scalar, 18.3 ms
# against XLA's 2.5 per 128x32x32x16 pass); no kernel here reads floating-point flags.
_FLAGS = [
    "-shared",
    "-fPIC",
    "-O3",
    "-march=native",
    "-fopenmp-simd",
    "-fno-math-errno",
    "-fno-trapping-math",
]

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_loaded = None  # the op module, once loaded
_failure = None  # why it did not load (str), once tried


class NativeKernelsError(RuntimeError):
    """The native kernels did not build or load (and RESTE_LARQ_NATIVE=1 asked for them)."""


def mode() -> str:
    """RESTE_LARQ_NATIVE: "auto" (default), "1" or "0"."""
    value = os.environ.get("RESTE_LARQ_NATIVE", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ConfigError(f"RESTE_LARQ_NATIVE={value!r}: expected one of {', '.join(MODES)}")
    return value


def _gpu_visible() -> bool:
    return bool(tf.config.list_logical_devices("GPU"))


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _command(cxx, source, output):
    return [
        cxx,
        *_FLAGS,
        *tf.sysconfig.get_compile_flags(),
        source,
        "-o",
        output,
        *tf.sysconfig.get_link_flags(),
    ]


def build(cache_dir: str | None = None, cxx: str | None = None) -> str:
    """Compile ``reste_ops.cc`` (if not already in the cache) and return the library's
    path. Raises `NativeKernelsError` with the compiler's message on failure."""
    cxx = cxx or os.environ.get("CXX") or "g++"
    cache_dir = (
        cache_dir
        or os.environ.get("RESTE_LARQ_CACHE_DIR")
        or os.path.join(os.path.expanduser("~"), ".cache", "reste_larq")
    )
    if shutil.which(cxx) is None:
        raise NativeKernelsError(
            f"no C++ compiler {cxx!r} on PATH (install g++, e.g. `apt-get install g++`, or set CXX)"
        )
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(
        b"\0".join(
            [
                source,
                tf.__version__.encode(),
                " ".join(_command(cxx, "", "")).encode(),
                _cpu_flags().encode(),
            ]
        )
    ).hexdigest()[:16]
    directory = os.path.join(cache_dir, "native", key)
    library = os.path.join(directory, "reste_ops.so")
    if os.path.exists(library):
        return library
    os.makedirs(directory, exist_ok=True)
    partial = f"{library}.{os.getpid()}.{threading.get_ident()}.tmp"
    _log.info("reste_larq: building the native kernels into %s (once)", directory)
    try:
        done = subprocess.run(
            _command(cxx, SOURCE, partial),
            capture_output=True,
            text=True,
            timeout=_BUILD_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise NativeKernelsError(f"{cxx} failed to run: {error}") from error
    if done.returncode:
        errors = [line for line in done.stderr.splitlines() if "error" in line]
        raise NativeKernelsError(
            f"{cxx} exited with {done.returncode}: "
            + " | ".join((errors or done.stderr.splitlines() or ["no output"])[:5])
        )
    os.replace(partial, library)  # atomic: other processes see all of it or nothing
    return library


@tf.autograph.experimental.do_not_convert  # called while a gradient is traced
def ops():
    """The loaded kernels (``.reste_grad``, ``.ste_grad``, ...), or None where they are off
    (RESTE_LARQ_NATIVE=0) or did not build (a warning said why, once)."""
    global _loaded, _failure
    wanted = mode()
    if wanted == "0":
        return None
    if _gpu_visible():
        return None  # CPU kernels: on a GPU they would copy every tensor to the host
    if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
        return None  # traced for XLA (`jit_compile=True`, `--jit-compile`): no custom ops
    if save_context.in_save_context():
        # A SavedModel stores the gradient functions it traces (custom gradients): with
        # the XLA kernels in them it loads where this library was never built.
        return None
    if _loaded is None and _failure is None:
        with _lock:
            if _loaded is None and _failure is None:
                try:
                    _loaded = tf.load_op_library(build())
                except (NativeKernelsError, tf.errors.OpError, OSError) as error:
                    _failure = str(error)
                    if wanted == "auto":
                        _log.warning(
                            "reste_larq: native kernels unavailable, training with the XLA "
                            "kernels (the same values, slower on CPUs): %s",
                            _failure,
                        )
    if _loaded is None and wanted == "1":
        raise NativeKernelsError(f"RESTE_LARQ_NATIVE=1 but the kernels did not load: {_failure}")
    return _loaded


@tf.autograph.experimental.do_not_convert
def ops_for(*tensors):
    """`ops()` if the tensors share one of the kernels' dtypes (`DTYPES`), else None:
    the kernels take their inputs in one dtype, float32 or bfloat16."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or dtypes.pop() not in DTYPES:
        return None
    return ops()


@tf.autograph.experimental.do_not_convert
def status() -> str:
    """One line: which backward kernels training uses, and why."""
    if mode() == "0":
        return "XLA kernels (RESTE_LARQ_NATIVE=0)"
    if _gpu_visible():
        return "XLA kernels (a GPU is visible: the native kernels are CPU-only)"
    if _loaded is not None:
        return "native kernels"
    if _failure is not None:
        return f"XLA kernels (native kernels unavailable: {_failure})"
    return "native kernels not loaded yet (built on first use)"
