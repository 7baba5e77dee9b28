"""A run that never loses work: SIGKILL a small CIFAR run at the points where a
preempted job dies, restart the same command with --auto-resume, and end with the
history.csv, final weight digest and best epoch of the uninterrupted run."""

import csv
import json
import os
import signal
import subprocess
import sys

import pytest

from tests.test_train import QUICK, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POINTS = [
    "before_first_checkpoint",
    "inside_epoch",
    "between_checkpoint_and_state",
    "during_export",
]


def rows(run):
    with open(os.path.join(run, "history.csv")) as f:
        return list(csv.DictReader(f))


def metrics(run):
    with open(os.path.join(run, "metrics.json")) as f:
        return json.load(f)


@pytest.mark.slow  # a TensorFlow subprocess per kill; the in-process crash: test_train.py
def test_sigkill_at_every_point_then_the_same_command_ends_as_an_uninterrupted_run(
    cifar_dir, tmp_path
):
    argv = [
        "--data-dir",
        str(cifar_dir),
        "--results-dir",
        str(tmp_path),
        *QUICK,
        "--epochs",
        "3",
        "--export-eval-limit",
        "16",
        "--auto-resume",
    ]
    assert run_cli(*argv, "--name", "straight") == 0
    straight = str(tmp_path / "straight")
    for point in POINTS:
        killed = subprocess.run(
            [sys.executable, "-m", "tests.kill_at", point, *argv, "--name", point],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-2000:])
        run = str(tmp_path / point)
        assert not os.path.exists(os.path.join(run, "metrics.json")), point
        assert run_cli(*argv, "--name", point) == 0, point  # the same command
        assert rows(run) == rows(straight), point
        got, want = metrics(run), metrics(straight)
        for key in ("weights_sha256", "best_test_top1", "best_epoch", "test_top1"):
            assert got[key] == want[key], (point, key)
        assert got["tflite_lce_bconv2d"] == want["tflite_lce_bconv2d"] == 18, point
        assert os.path.isfile(os.path.join(run, "model.tflite")), point
