"""reste_larq.config, rundir and experiment: the run machinery as a library (the CLIs'
behaviour through them is tested in test_train.py, test_fault_injection.py)."""

import dataclasses
import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from reste_larq import data, rundir
from reste_larq.config import CONFIG_VERSION, FIELDS_ADDED_LATER, RunConfig
from reste_larq.errors import ConfigError, RunError
from tests.test_data import write_idx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_example():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    (block,) = [b for b in blocks if "Experiment(config).run()" in b]
    return block


@pytest.mark.slow  # a 2-epoch run with export (~35 s); default-suite guards: test_train.py
def test_readme_example_runs_exports_and_the_same_code_continues(tmp_path, monkeypatch, capsys):
    """The README's Python example, as written, on a small Fashion-MNIST made here
    (the dataset's default folder pointed at it)."""
    files = tmp_path / "fashion"
    files.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 256), ("test", 32)):
        write_idx(str(files), split, rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n))
    ds = dataclasses.replace(data.DATASETS["fashion_mnist"], default_dirs=(str(files),))
    monkeypatch.setitem(data.DATASETS, "fashion_mnist", ds)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(readme_example(), namespace)
    metrics = namespace["metrics"]
    run = tmp_path / "results" / "fmnist_reste"
    assert metrics["epochs"] == 2 and len(metrics["per_epoch"]) == 2
    assert metrics["tflite_lce_bconv2d"] == metrics["binary_convs"] == 18
    assert metrics["data_source"] == f"official files in {files}"
    assert os.path.isfile(run / "model.tflite")
    assert RunConfig.from_json(json.loads((run / "args.json").read_text())) == (
        namespace["config"].resolved()
    )
    capsys.readouterr()
    again = {}
    exec(readme_example(), again)  # the same code: a finished run is reported, not redone
    assert "holds a finished run: nothing to do" in capsys.readouterr().err
    assert again["metrics"]["weights_sha256"] == metrics["weights_sha256"]


def test_args_json_round_trips_and_older_versions_load():
    config = RunConfig(dataset="mnist", epochs=3, lr_steps=[1, 2], name="x").resolved()
    saved = json.loads(json.dumps(config.to_json()))
    assert saved["config_version"] == CONFIG_VERSION
    assert RunConfig.from_json(saved) == config
    # version 1: the CLI's namespace, without the fields added later, with CLI-only flags
    old = {k: v for k, v in saved.items() if k not in FIELDS_ADDED_LATER}
    old.pop("config_version")
    old["stages"] = ["float", "1w1a"]  # train.multistage wrote its own flags too
    loaded = RunConfig.from_json(old)
    assert loaded.block == "reference" and loaded.bn_momentum == 0.9 and loaded.epochs == 3
    with pytest.raises(ConfigError, match="config_version 99"):
        RunConfig.from_json({**saved, "config_version": 99})
    with pytest.raises(ConfigError, match=r"does not know: \['colour'\]"):
        RunConfig.from_json({**saved, "colour": "blue"})


def test_resolved_fills_what_depends_on_other_fields():
    assert RunConfig().resolved().lr == 0.1 and RunConfig().resolved().lr_schedule == "cosine"
    adam = RunConfig(optimizer="adam").resolved()
    assert (adam.lr, adam.lr_schedule) == (1e-3, "linear")
    assert RunConfig(model="birealnet18").resolved().quantizer == "bireal"
    assert RunConfig(quantizer="ReSTE").resolved().quantizer == "reste"
    assert (
        RunConfig(name=None, a32=True)
        .resolved()
        .run_dir()
        .endswith("resnet20_1w1a_reste_cifar10_a32")
    )


def test_run_folder_states_and_what_a_config_may_do(tmp_path):
    """new -> started -> checkpointed -> finished, and decide()'s verdict in each."""
    config = RunConfig(results_dir=str(tmp_path), name="r").resolved()
    folder = rundir.RunFolder(config.run_dir())
    resume = dataclasses.replace(config, resume=True)
    auto = dataclasses.replace(config, auto_resume=True)

    assert folder.state() == rundir.NEW
    assert folder.decide(config) == folder.decide(auto) == rundir.START
    with pytest.raises(RunError, match="--resume: no run in"):
        folder.decide(resume)

    os.makedirs(folder.path)
    folder.write_config(config)
    assert folder.state() == rundir.STARTED  # killed before its first checkpoint
    assert folder.decide(config) == folder.decide(resume) == rundir.START
    with pytest.raises(RunError, match=r"--seed 7 \(run has 1234\)"):
        folder.decide(dataclasses.replace(config, seed=7))

    tf.train.CheckpointManager(
        tf.train.Checkpoint(v=tf.Variable(1.0)), folder.checkpoint_dir, max_to_keep=1
    ).save()
    assert folder.state() == rundir.CHECKPOINTED
    assert folder.decide(resume) == folder.decide(auto) == rundir.RESUME
    with pytest.raises(RunError, match="already holds a run; pass --resume"):
        folder.decide(config)

    folder.write_metrics({"test_top1": 1.0})
    assert folder.state() == rundir.FINISHED
    assert folder.decide(auto) == rundir.FINISHED
    with pytest.raises(RunError, match="holds a finished run"):
        folder.decide(resume)
    with pytest.raises(RunError, match="already holds a run"):
        folder.decide(config)


def test_cut_history_keeps_the_checkpointed_epochs(tmp_path):
    folder = rundir.RunFolder(str(tmp_path))
    path = tmp_path / "history.csv"
    path.write_bytes(b"epoch,loss\r\n0,2.0\r\n1,1.5\r\n2,1.2\r\n3,1.")  # the last cut short
    folder.cut_history(2)
    assert path.read_bytes() == b"epoch,loss\r\n0,2.0\r\n1,1.5\r\n"
    folder.cut_history(2)  # nothing more to cut
    assert path.read_bytes() == b"epoch,loss\r\n0,2.0\r\n1,1.5\r\n"
