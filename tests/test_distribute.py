"""The workers' agreement in one process: TF_CONFIG parsing, and the barriers' exchange
run as two workers would run it (each worker's own call encodes its verdict; a fake
all-reduce sums what both brought). Real two-process runs: tests/test_multi_worker.py
(slow)."""

import json

import numpy as np
import pytest
import tensorflow as tf

from reste_larq import distribute
from reste_larq.distribute import BarrierTimeout
from reste_larq.errors import ConfigError, RunError

TWO_WORKERS = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}


def as_task(monkeypatch, cluster, kind, index):
    monkeypatch.setenv(
        "TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": kind, "index": index}})
    )


def test_worker_task_and_cluster_tasks_follow_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert distribute.worker_task() == (True, "chief0")  # one process: the chief
    assert distribute.cluster_tasks() == []
    as_task(monkeypatch, TWO_WORKERS, "worker", 0)
    assert distribute.worker_task() == (True, "worker0")  # no "chief" task: worker 0 is
    as_task(monkeypatch, TWO_WORKERS, "worker", 1)
    assert distribute.worker_task() == (False, "worker1")
    with_chief = {"worker": ["a:1", "a:2"], "chief": ["a:3"]}
    as_task(monkeypatch, with_chief, "worker", 0)
    assert distribute.worker_task() == (False, "worker0")
    assert distribute.cluster_tasks() == ["chief0", "worker0", "worker1"]
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(RunError, match="TF_CONFIG is not JSON"):
        distribute.worker_task()


def two_workers(monkeypatch, call):
    """Run `call(i)` as worker 0 and worker 1 of TWO_WORKERS through a fake all-reduce:
    a first pass collects what each worker's call brings, the second gives every call
    the sum. Returns each worker's (result or raised exception)."""
    brought = {}
    outcome = {}
    for pass_ in ("collect", "reduce"):

        def fake_sum(strategy, value, timeout=None, i=None):
            value = value.numpy()
            if pass_ == "collect":
                brought[i] = value
                return value
            return sum(brought.values())

        for i in (0, 1):
            as_task(monkeypatch, TWO_WORKERS, "worker", i)
            monkeypatch.setattr(
                distribute, "sum_over_workers", lambda s, v, t=None, i=i: fake_sum(s, v, t, i)
            )
            try:
                outcome[i] = call(i)
            except Exception as error:  # noqa: BLE001  (the outcome under test)
                outcome[i] = error
    return outcome


def test_exchange_gives_every_worker_each_tasks_code_and_line(monkeypatch):
    lines = ["worker zero: ok", "Unicode \u00e9 and a long line " + "x" * 900]
    out = two_workers(monkeypatch, lambda i: distribute._exchange(None, 2 - i, lines[i], 3, 5))
    expected = [("worker0", 2, lines[0]), ("worker1", 1, lines[1].encode()[:600].decode())]
    assert out[0] == out[1] == expected


def test_start_barrier_names_the_first_refusing_worker_on_every_worker(monkeypatch):
    errors = [None, RunError("results/r already holds a finished run")]
    out = two_workers(monkeypatch, lambda i: distribute.workers_agree(None, errors[i], False))
    for i in (0, 1):
        assert isinstance(out[i], RunError)
        assert str(out[i]) == "worker1 refused the run: results/r already holds a finished run"


def test_start_barrier_refuses_workers_that_see_different_folders(monkeypatch):
    out = two_workers(monkeypatch, lambda i: distribute.workers_agree(None, None, resume=bool(i)))
    assert all(isinstance(out[i], RunError) and "disagree" in str(out[i]) for i in (0, 1))
    same = two_workers(monkeypatch, lambda i: distribute.workers_agree(None, None, resume=True))
    assert same == {0: None, 1: None}


def test_start_barrier_refuses_workers_that_chose_different_precisions(monkeypatch):
    """--mixed-precision auto resolves per machine: workers on different CPUs must not
    train one model in two precisions."""
    chosen = ["bfloat16", "off"]
    out = two_workers(
        monkeypatch, lambda i: distribute.workers_agree(None, None, False, 5, chosen[i])
    )
    for i in (0, 1):
        assert isinstance(out[i], RunError)
        assert "different precisions (worker0: bfloat16, worker1: off)" in str(out[i])
    same = two_workers(monkeypatch, lambda i: distribute.workers_agree(None, None, False, 5, "off"))
    assert same == {0: None, 1: None}


def test_end_barrier_stops_the_other_workers_with_the_chiefs_error(monkeypatch):
    errors = [ValueError("export broke"), None]
    out = two_workers(monkeypatch, lambda i: distribute.finish_together(None, errors[i]))
    assert out[0] is errors[0]  # the chief re-raises its own error after telling the others
    assert isinstance(out[1], RunError)
    assert str(out[1]) == (
        "worker0 failed after training, in evaluation or export: ValueError: export broke"
    )
    assert two_workers(monkeypatch, lambda i: distribute.finish_together(None, None)) == {
        0: None,
        1: None,
    }


@pytest.mark.parametrize(
    "lost, start, end",
    [
        (
            BarrierTimeout(timeout=20),
            "a worker did not reach the start-of-run barrier within 20 s: start every worker",
            "worker0 did not reach the end-of-run barrier within 20 s: it failed, hangs or",
        ),
        (
            BarrierTimeout(gone=True),
            "a worker left before the start-of-run barrier (its process is gone): start",
            "worker0 left before the end-of-run barrier (its process is gone): it failed",
        ),
    ],
)
def test_a_worker_lost_at_a_barrier_is_named_and_an_own_error_wins(monkeypatch, lost, start, end):
    def gone(strategy, value, timeout=None):
        raise lost

    as_task(monkeypatch, TWO_WORKERS, "worker", 1)
    monkeypatch.setattr(distribute, "sum_over_workers", gone)
    with pytest.raises(BarrierTimeout) as at_start:
        distribute.workers_agree(None, None, False, timeout=20)
    assert str(at_start.value).startswith(start)
    with pytest.raises(BarrierTimeout) as at_end:
        distribute.finish_together(None, None, timeout=20)
    assert str(at_end.value).startswith(end)
    assert (at_end.value.gone, at_start.value.gone) == (lost.gone, lost.gone)

    own = RunError("this worker's own refusal")
    with pytest.raises(RunError, match="own refusal"):
        distribute.workers_agree(None, own, False, timeout=20)
    with pytest.raises(RunError, match="own refusal"):
        distribute.finish_together(None, own, timeout=20)


def test_barrier_timeout_says_what_happened_at_which_barrier():
    assert str(BarrierTimeout(timeout=2.5)) == "did not reach a barrier within 2.5 s"
    assert str(BarrierTimeout()) == "did not reach a barrier in time"
    gone = BarrierTimeout(gone=True)
    assert gone.at("the end") == "left before the end (its process is gone)"
    assert str(BarrierTimeout("custom", timeout=3)) == "custom"


def test_one_process_exchanges_through_a_real_all_reduce(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])  # has worker_devices, as MWMS
    total = distribute.sum_over_workers(strategy, tf.constant([1.5, -2.0]), timeout=30)
    np.testing.assert_array_equal(total, [1.5, -2.0])
    assert distribute._exchange(strategy, 1, "only me", 2, 30) == [("chief0", 1, "only me")]
    distribute.workers_agree(strategy, None, resume=False, timeout=30)
    with pytest.raises(RunError, match="chief0 refused the run: no"):
        distribute.workers_agree(strategy, RunError("no"), resume=False, timeout=30)
    assert distribute.make_strategy("default") is tf.distribute.get_strategy()


def test_deterministic_after_the_runtime_started_says_how(monkeypatch):
    tf.constant(1.0) + 1.0  # the runtime is up
    monkeypatch.setattr(tf.config.experimental, "enable_op_determinism", lambda: None)
    if tf.config.threading.get_inter_op_parallelism_threads() == 1:
        pytest.skip("this process already runs one inter-op thread")
    with pytest.raises(ConfigError, match="make_deterministic\\(\\).*before any TensorFlow op"):
        distribute.make_deterministic()
