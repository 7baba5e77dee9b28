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


CPUINFO = "processor\t: {i}\nmodel name\t: x\nflags\t\t: fpu sse2 avx2 {extra}\n\n"


@pytest.mark.parametrize(
    "cpuinfo, expected",
    [
        ("".join(CPUINFO.format(i=i, extra="avx512f avx512_bf16 amx_tile") for i in (0, 1)), True),
        (CPUINFO.format(i=0, extra="avx512f avx512bw avx512_vnni"), False),
        # the flag in another field is not the CPU's
        (CPUINFO.format(i=0, extra="avx512f").replace("model name", "bugs: avx512_bf16"), False),
        ("", False),
    ],
)
def test_cpu_bf16_detection_reads_the_flags_line(monkeypatch, cpuinfo, expected):
    from reste_larq.config import CPU_BF16_ENV, cpu_has_avx512_bf16

    monkeypatch.delenv(CPU_BF16_ENV)
    assert cpu_has_avx512_bf16(cpuinfo) is expected


def test_auto_precision_is_bfloat16_only_on_a_bf16_cpu_without_gpu(monkeypatch):
    from reste_larq import config as config_lib
    from reste_larq.config import CPU_BF16_ENV

    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert RunConfig().resolved().mixed_precision == "bfloat16"
    assert RunConfig(mixed_precision="off").resolved().mixed_precision == "off"
    assert RunConfig(mixed_precision="float16").resolved().mixed_precision == "float16"
    resolved = RunConfig().resolved()
    assert resolved.resolved() == resolved  # args.json keeps the choice, never "auto"
    assert RunConfig.from_json(resolved.to_json()).mixed_precision == "bfloat16"
    gpus = [tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")]
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: gpus)
    assert config_lib.auto_precision() == "off"  # GPUs are untested with it: float32
    monkeypatch.undo()
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert RunConfig().resolved().mixed_precision == "off"
    monkeypatch.setenv(CPU_BF16_ENV, "yes")
    with pytest.raises(ConfigError, match="RESTE_LARQ_CPU_BF16 must be 1 or 0"):
        RunConfig().resolved()
    # this machine's own answer, from /proc/cpuinfo
    monkeypatch.delenv(CPU_BF16_ENV)
    with open("/proc/cpuinfo") as f:
        has = " avx512_bf16" in f.read()
    assert config_lib.cpu_has_avx512_bf16() is has


def test_a_run_resumed_where_auto_means_another_precision_says_so(tmp_path, monkeypatch):
    """args.json holds what auto chose: a resume on a CPU where auto chooses otherwise
    is refused with the flag that continues it."""
    from reste_larq.config import CPU_BF16_ENV

    monkeypatch.setenv(CPU_BF16_ENV, "1")
    config = RunConfig(results_dir=str(tmp_path), name="r").resolved()
    folder = rundir.RunFolder(config.run_dir())
    os.makedirs(folder.path)
    folder.write_config(config)
    assert json.loads((tmp_path / "r" / "args.json").read_text())["mixed_precision"] == "bfloat16"
    tf.train.CheckpointManager(
        tf.train.Checkpoint(v=tf.Variable(1.0)), folder.checkpoint_dir, max_to_keep=1
    ).save()
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    elsewhere = RunConfig(results_dir=str(tmp_path), name="r", resume=True).resolved()
    with pytest.raises(RunError, match=r"--mixed-precision off \(run has bfloat16\)"):
        folder.decide(elsewhere)
    explicit = RunConfig(
        results_dir=str(tmp_path), name="r", resume=True, mixed_precision="bfloat16"
    ).resolved()
    assert folder.decide(explicit) == rundir.RESUME


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
