"""A training run's configuration: one typed object that the CLIs fill from their flags,
that `args.json` round-trips, and that `reste_larq.experiment.Experiment` runs.

Field `x_y` is flag `--x-y` of `python -m train.cifar` / `train.imagenet`; the defaults
are the ReSTE reference's CIFAR-10 recipe (resnet20_1w1a, SGD 0.1, momentum 0.9, coupled
weight decay 1e-4, batch 256, cosine decay, o: 1 -> 3, 1000 epochs).

```python
from reste_larq.config import RunConfig

config = RunConfig(dataset="fashion_mnist", epochs=3, results_dir="results", name="f3")
config.to_json()                       # what args.json holds
RunConfig.from_json(config.to_json())  # == config
```

`args.json` carries `config_version`. A run folder written before a field existed
loads with the value such runs had (`FIELDS_ADDED_LATER`), so older folders still
resume and evaluate; a newer version, or a field this version does not know, is an
error that says so.
"""

from __future__ import annotations

import dataclasses
import os

from reste_larq.errors import ConfigError

CONFIG_VERSION = 2  # 1: the CLI's argparse namespace as it was written before
PRECISION_POLICIES = {"off": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}
# "auto" (the default) is resolved per machine by `auto_precision`: a run's args.json
# holds what it resolved to, never "auto".
PRECISION_CHOICES = ("auto", *PRECISION_POLICIES)
# Overrides the CPU detection of `cpu_has_avx512_bf16` ("1" / "0"): for tests, which
# must train the same on every machine, and for a machine whose /proc/cpuinfo is wrong.
CPU_BF16_ENV = "RESTE_LARQ_CPU_BF16"
ADAM_LR = 1e-3  # Adam's usual rate in the Bi-Real / BNN-tricks recipes
STRATEGIES = ("default", "mirrored", "multi_worker")


@dataclasses.dataclass
class RunConfig:
    # data
    dataset: str = "cifar10"
    data_dir: str | None = None
    download: bool = True
    train_limit: int | None = None
    test_limit: int | None = None
    # small-image augmentation and normalization (train.cifar)
    crop_padding: str = "zero"
    rotate: float = 0.0
    mixup: float = 0.0
    mean_std: str = "dataset"
    # ImageNet augmentation (train.imagenet)
    shuffle_buffer: int = 10_000
    color_jitter: bool = False
    lighting: bool = False
    # model and estimator
    model: str = "resnet20_1w1a"
    quantizer: str | None = None  # None: the model's own estimator
    a32: bool = False
    w32: bool = False
    block: str = "reference"
    downsample: str = "reference"
    bn_momentum: float = 0.9
    padding: str = "one"
    o_end: float = 3.0
    mu_start: float = 20.0
    mu_end: float = 200.0
    # optimization and schedules
    epochs: int = 1000
    batch_size: int = 256
    batch_size_test: int = 128
    optimizer: str = "sgd"
    lr: float | None = None  # None: sgd_lr with sgd, ADAM_LR with adam
    sgd_lr: float = 0.1  # the recipe's SGD rate (the CLIs set it per recipe)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup: int = 0
    lr_schedule: str | None = None  # None: cosine with sgd, linear with adam
    lr_steps: list[int] | None = None
    lr_gamma: float = 0.1
    sgdr_period: int = 2
    sgdr_mult: float = 2.0
    lr_min: float = 0.0
    label_smoothing: float = 0.0
    seed: int = 1234
    # distillation
    teacher: str | None = None
    distill_weight: float = 1.0
    distill_temperature: float = 1.0
    # speed
    mixed_precision: str = "auto"  # auto_precision(): bfloat16 on AVX-512 BF16 CPUs
    jit_compile: bool = False
    # run state
    results_dir: str = "./results"
    name: str | None = None
    resume: bool = False
    auto_resume: bool = False
    evaluate: str | None = None
    init_from: str | None = None
    indicators: bool = False
    verbose: int = 1
    # export
    export: bool = True
    export_eval_limit: int | None = None
    export_packed: bool = False
    # distribution
    strategy: str = "default"
    logical_cpus: int | None = None
    deterministic: bool = False  # distribute.make_deterministic()
    barrier_timeout: float = 7200.0  # s a worker waits for the others at a barrier

    # ------------------------------------------------------------------ derived
    def resolved(self) -> RunConfig:
        """A copy with the defaults that depend on other fields filled: lr on the
        optimizer, the schedule on the optimizer, the estimator on the model (its own),
        the estimator's canonical name."""
        from reste_larq import models
        from reste_larq.quantizers import canonical_estimator

        config = dataclasses.replace(self)
        if config.lr is None:
            config.lr = ADAM_LR if config.optimizer == "adam" else config.sgd_lr
        if config.lr_schedule is None:
            config.lr_schedule = "linear" if config.optimizer == "adam" else "cosine"
        if config.quantizer is None:
            config.quantizer = models.info(config.model).quantizer
        if config.quantizer != "float":
            config.quantizer = canonical_estimator(config.quantizer)
        if config.mixed_precision == "auto":
            config.mixed_precision = auto_precision()
        return config

    def run_dir(self) -> str:
        """results_dir/name, the name defaulting to model_quantizer_dataset[_a32|_w32]."""
        name = self.name or f"{self.model}_{self.quantizer}_{self.dataset}" + (
            "_a32" if self.a32 else ""
        ) + ("_w32" if self.w32 else "")
        return os.path.join(self.results_dir, name)

    # ------------------------------------------------------------------ args.json
    def to_json(self) -> dict:
        return {"config_version": CONFIG_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> RunConfig:
        """The configuration an args.json holds (any version up to CONFIG_VERSION)."""
        data = dict(data)
        version = data.pop("config_version", 1)
        if version > CONFIG_VERSION:
            raise ConfigError(
                f"args.json has config_version {version}; this reste_larq reads up to "
                f"{CONFIG_VERSION}: update reste_larq to load it"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown and version >= 2:
            raise ConfigError(f"args.json has fields this version does not know: {unknown}")
        # version 1 held every flag of its CLI (train.multistage's stage list, too)
        data = {k: v for k, v in data.items() if k in names}
        return cls(**{**FIELDS_ADDED_LATER, **data})

    @classmethod
    def from_namespace(cls, namespace) -> RunConfig:
        """From the CLIs' argparse namespace (flags the dataclass does not have, such
        as train.multistage's stage list, are left out)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(namespace).items() if k in names})

    def changed(self, other: RunConfig) -> list[str]:
        """The run-defining fields in which `other` differs, as flags ("--seed 7 (run
        has 1234)"): a resumed run must be given the same ones."""
        return [
            f"--{k.replace('_', '-')} {getattr(self, k)} (run has {getattr(other, k)})"
            for k in RUN_DEFINING
            if getattr(self, k) != getattr(other, k)
        ]


def cpu_has_avx512_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bfloat16 natively (the `avx512_bf16` flag of Linux's
    /proc/cpuinfo; `RESTE_LARQ_CPU_BF16=1|0` overrides). Other systems: False (no
    detection there; choose `mixed_precision="bfloat16"` yourself)."""
    override = os.environ.get(CPU_BF16_ENV)
    if override is not None:
        if override not in ("0", "1"):
            raise ConfigError(f"{CPU_BF16_ENV} must be 1 or 0 (got {override!r})")
        return override == "1"
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    return any(
        line.startswith("flags") and "avx512_bf16" in line.split(":", 1)[-1].split()
        for line in cpuinfo.splitlines()
    )


def auto_precision() -> str:
    """What `mixed_precision="auto"` means on this machine: "bfloat16" on a CPU with
    AVX-512 BF16 and no GPU visible to TensorFlow, else "off" (float32).

    Measured (docs/results.md, "bfloat16, three seeds"): on such a CPU, bfloat16 trains
    resnet20_1w1a 1.35x faster, and its mean top-1 over three seeds lies inside
    float32's seed range (ReSTE 81.20 against 81.30, STE 78.40 against 78.80, 6 epochs
    of Fashion-MNIST). Without native bfloat16 it is slower than float32, and GPUs are
    untested here, so both keep float32. The exported .tflite is always float32 (the
    model's float32 twin), so its top-1 can differ from the bfloat16 Keras top-1 by a
    few tenths."""
    if not cpu_has_avx512_bf16():
        return "off"
    import tensorflow as tf

    return "off" if tf.config.list_physical_devices("GPU") else "bfloat16"


# Fields that define a run: a resumed run must be given the same ones.
RUN_DEFINING = (
    "model",
    "quantizer",
    "dataset",
    "epochs",
    "lr",
    "batch_size",
    "optimizer",
    "momentum",
    "weight_decay",
    "warmup",
    "o_end",
    "mu_start",
    "mu_end",
    "a32",
    "w32",
    "block",
    "downsample",
    "padding",
    "mean_std",
    "crop_padding",
    "rotate",
    "mixup",
    "color_jitter",
    "lighting",
    "shuffle_buffer",
    "label_smoothing",
    "seed",
    "train_limit",
    "mixed_precision",
    "lr_schedule",
    "lr_steps",
    "lr_gamma",
    "sgdr_period",
    "sgdr_mult",
    "lr_min",
    "bn_momentum",
    "teacher",
    "distill_weight",
    "distill_temperature",
)

# Run-defining fields added later, with the value runs made before them had.
FIELDS_ADDED_LATER = {
    "mixed_precision": "off",
    "lr_steps": None,
    "lr_gamma": 0.1,
    "sgdr_period": 2,
    "sgdr_mult": 2.0,
    "lr_min": 0.0,
    "bn_momentum": 0.9,
    "teacher": None,
    "distill_weight": 1.0,
    "distill_temperature": 1.0,
    "w32": False,
    "block": "reference",
    "downsample": "reference",
    "mean_std": "dataset",
    "crop_padding": "zero",
    "rotate": 0.0,
    "mixup": 0.0,
    "color_jitter": False,
    "lighting": False,
    "shuffle_buffer": 10_000,
}
