"""Strategies, the chief, and agreement between the workers of a multi-worker run.

`MultiWorkerMirroredStrategy` runs the same program in every worker process (TF_CONFIG
names the cluster and this task). Only the chief writes the run folder; every worker
must reach the same decision about it before anything is written (`workers_agree`), and
an all-reduce of a small tensor is the barrier that carries that decision.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import tensorflow as tf

from reste_larq.errors import ConfigError, RunError


def make_strategy(strategy: str = "default", logical_cpus: int | None = None):
    """ "default" (one device), "mirrored" (the GPUs, else `logical_cpus` CPU devices) or
    "multi_worker" (TF_CONFIG's cluster)."""
    if logical_cpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * logical_cpus
        )
    if strategy == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or [
            d.name for d in tf.config.list_logical_devices("CPU")
        ]
        return tf.distribute.MirroredStrategy(devices)
    if strategy == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def make_deterministic():
    """The same command gives the same weights bit for bit: op determinism (GPU
    reductions, cuDNN) and one inter-op thread.

    The inter-op thread is for CPUs. Measured here (TF 2.19.1, 2 cores): Bi-Real-18 at
    224 px with coupled weight decay, the same batch and initial weights, ends a train
    step with the stem kernel 1 ulp apart: `benchmarks/determinism.py` (four runs of four
    steps) found 3 of 3 runs leaving run 0's weights, the same with
    `enable_op_determinism()` alone, and 0 of 3 with one inter-op thread. A binary
    network turns such an ulp into flipped signs and a different run within epochs.
    Ops still use every core inside themselves (intra-op threads).

    Both settings are process-wide; the thread count can only be set before TensorFlow
    starts its runtime, so call this first (the CLIs do, for `--deterministic`)."""
    tf.config.experimental.enable_op_determinism()
    try:
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        # Already running: fine if someone set it already, else say how to get it.
        if tf.config.threading.get_inter_op_parallelism_threads() != 1:
            raise ConfigError(
                "deterministic training needs one inter-op thread, and TensorFlow's runtime "
                "had already started with more: call "
                "reste_larq.distribute.make_deterministic() (or "
                "tf.config.threading.set_inter_op_parallelism_threads(1)) before any "
                "TensorFlow op, or run the CLI with --deterministic in a fresh process"
            ) from None


def worker_task() -> tuple[bool, str]:
    """(is_chief, name) of this process from TF_CONFIG: the chief is the task of type
    "chief", else worker 0 (TensorFlow's convention); a single process is the chief."""
    try:
        config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    except json.JSONDecodeError as error:
        raise RunError(f"TF_CONFIG is not JSON: {error}") from None
    task = config.get("task") or {}
    kind, index = task.get("type", "chief"), int(task.get("index", 0))
    chief = kind == "chief" or (
        kind == "worker" and index == 0 and "chief" not in config.get("cluster", {})
    )
    return chief, f"{kind}{index}"


BARRIER_TIMEOUT = 7200.0  # s: the chief's final evaluation and export fit in it


class BarrierTimeout(RunError):
    """A worker did not reach a barrier in time (it hangs or is slow: `timeout` is the
    seconds waited) or left before it (`gone`: its process is gone). `at(barrier)`
    says which for a named barrier; `str()` is the message of the barrier that raised."""

    def __init__(self, message: str = "", *, gone: bool = False, timeout: float | None = None):
        self.gone, self.timeout = bool(gone), timeout
        super().__init__(message or self.at("a barrier"))

    def at(self, barrier: str) -> str:
        if self.gone:
            return f"left before {barrier} (its process is gone)"
        if self.timeout is None:
            return f"did not reach {barrier} in time"
        return f"did not reach {barrier} within {self.timeout:g} s"


def sum_over_workers(strategy, value, timeout: float | None = None):
    """All-reduce (sum) a small tensor over every replica: a barrier that carries data.
    With `timeout` (seconds) a worker that does not arrive in time raises
    BarrierTimeout here instead of leaving this one waiting for ever."""

    # Each local replica brings value / (its worker's replicas): the sum is over workers.
    local = len(getattr(strategy.extended, "worker_devices", ())) or 1
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)

    @tf.function
    def reduce():
        def replica_fn():
            context = tf.distribute.get_replica_context()
            return context.all_reduce(
                tf.distribute.ReduceOp.SUM, tf.identity(value) / local, options=options
            )

        return strategy.run(replica_fn)

    try:
        return strategy.experimental_local_results(reduce())[0].numpy()
    except tf.errors.DeadlineExceededError:
        raise BarrierTimeout(timeout=timeout) from None
    except tf.errors.UnavailableError:  # its process is gone: its port refuses
        raise BarrierTimeout(gone=True, timeout=timeout) from None


MESSAGE_BYTES = 600  # of a refusal's one line, shared with every worker


def cluster_tasks() -> list[str]:
    """Every task of TF_CONFIG's cluster, chief first ("chief0", "worker0", ...)."""
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    cluster = config.get("cluster", {})
    return [f"{kind}{i}" for kind in ("chief", "worker") for i in range(len(cluster.get(kind, [])))]


def _exchange(strategy, code: int, message: str, codes: int, timeout):
    """Every task brings a code in [0, codes) and a line; every task gets all of them,
    as [(task, code, line)] in cluster order. Bytes travel as floats: exact, and summed
    over tasks they never overlap (one row each)."""
    tasks = cluster_tasks() or ["chief0"]
    slot = tasks.index(worker_task()[1]) if len(tasks) > 1 else 0
    shared = np.zeros((len(tasks), codes + MESSAGE_BYTES), np.float32)
    shared[slot, code] = 1.0
    line = message.encode()[:MESSAGE_BYTES]
    shared[slot, codes : codes + len(line)] = np.frombuffer(line, np.uint8)
    total = np.rint(sum_over_workers(strategy, tf.constant(shared), timeout)).astype(np.int64)
    out = []
    for i, task in enumerate(tasks):
        row = total[i, codes:]
        text = bytes(row[: int(np.argmin(row)) if 0 in row else len(row)].astype(np.uint8))
        out.append((task, int(np.argmax(total[i, :codes])), text.decode(errors="replace")))
    return out


def workers_agree(
    strategy,
    error: Exception | None,
    resume: bool,
    timeout=BARRIER_TIMEOUT,
    precision: str | None = None,
):
    """A barrier before anything is written: every worker brings its verdict on the run
    (refuse, start, resume) and, if it refuses, its one-line reason. All go on only if
    all verdicts are the same; if any worker refused, every worker raises the same
    RunError, naming the first refusing task and its reason (so all exit 2 with the same
    line instead of waiting for a worker that left).

    `precision` (the run's resolved mixed_precision): the workers must also have chosen
    the same one, which `auto` does per machine (config.auto_precision)."""
    verdict = 0 if error else 1 + int(resume)  # refuse, start, resume
    line = str(error) if error else (precision or "")
    try:
        verdicts = _exchange(strategy, verdict, line, 3, timeout)
    except BarrierTimeout as lost:
        if error:
            raise error from None
        raise BarrierTimeout(
            "a worker " + lost.at("the start-of-run barrier") + ": start every "
            "worker of TF_CONFIG's cluster with the same command",
            gone=lost.gone,
            timeout=lost.timeout,
        ) from None
    refusing = [(task, line) for task, code, line in verdicts if code == 0]
    if refusing:
        raise RunError(f"{refusing[0][0]} refused the run: {refusing[0][1]}")
    if len({code for _, code, _ in verdicts}) > 1:
        raise RunError(
            "the workers disagree on the run folder (start or resume: they see different "
            "files); every worker must see the same --results-dir on a shared file system"
        )
    if len({line for _, _, line in verdicts}) > 1:
        chosen = ", ".join(f"{task}: {line}" for task, _, line in verdicts)
        raise RunError(
            f"the workers chose different precisions ({chosen}): --mixed-precision auto "
            "is bfloat16 only on CPUs with AVX-512 BF16; give every worker the same "
            "--mixed-precision"
        )


def finish_together(strategy, error: Exception | None, timeout=BARRIER_TIMEOUT):
    """The end-of-run barrier. The chief arrives after its evaluation and export, or
    after they failed (`error`), and says which; the other workers arrive when training
    ends and wait (at most `timeout` s) for it. A chief that failed makes every other
    worker raise a RunError naming it and its error; a chief that never arrives (killed,
    hung) makes them raise BarrierTimeout naming it, instead of waiting for ever.
    The chief itself re-raises its own error after telling the others."""
    chief = (cluster_tasks() or ["chief0"])[0]
    try:
        verdicts = _exchange(
            strategy,
            1 if error else 0,
            f"{type(error).__name__}: {error}" if error else "",
            2,
            timeout,
        )
    except BarrierTimeout as lost:
        if error:
            raise error
        raise BarrierTimeout(
            f"{chief} " + lost.at("the end-of-run barrier") + ": it failed, hangs or "
            "was killed during evaluation or export (see its log)",
            gone=lost.gone,
            timeout=lost.timeout,
        ) from None
    if error:
        raise error
    failed = [(task, line) for task, code, line in verdicts if code == 1]
    if failed:
        raise RunError(
            f"{failed[0][0]} failed after training, in evaluation or export: {failed[0][1]}"
        )


def weights_digest(model) -> str:
    """sha256 of every weight's bytes: equal digests, bit-identical models."""
    digest = hashlib.sha256()
    for w in model.get_weights():
        digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()
