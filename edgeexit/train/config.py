"""Configuration dataclasses (torch-free): what model.pt records and what `edgeexit train` takes, with every default."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from edgeexit.errors import ConfigError
from edgeexit.registry import Registry
from edgeexit.runtime.datasets import DEFAULT_DATA
from edgeexit.runtime.manifest import PolicySpec


@dataclass
class ModelConfig:
    """Everything needed to rebuild an exit-augmented model from its state_dict."""

    backbone: str = "resnet20"
    backbone_args: dict[str, Any] = field(default_factory=dict)
    backbone_source: dict[str, Any] = field(default_factory=dict)  # provenance: package versions, a pt2 sha256
    method: str = "eenet"
    exit_type: str = "pool"
    exit_args: dict[str, Any] = field(default_factory=dict)
    cuts: list[str] = field(default_factory=list)
    num_classes: int = 10
    input_shape: tuple[int, int, int] = (1, 32, 32)
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])
    class_names: list[str] = field(default_factory=list)
    policy: PolicySpec = field(default_factory=lambda: PolicySpec("confidence", 0.5))
    frozen_backbone: bool = False

    def exit_policy(self, index: int) -> PolicySpec:
        """The policy of exit `index`, per-exit args (e.g. a beta list) resolved."""
        return self.policy.for_exit(index, len(self.cuts))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_shape"] = list(self.input_shape)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if isinstance(known.get("policy"), dict):
            known["policy"] = PolicySpec.from_dict(known["policy"], "config.policy")
        config = cls(**known)
        config.input_shape = tuple(config.input_shape)
        return config


@dataclass(frozen=True)
class Optimizer:
    """An --optimizer choice: the torch.optim class, its fixed settings, and the learning rate it defaults to."""

    torch_class: str
    lr: float
    settings: dict[str, Any] = field(default_factory=dict)


OPTIMIZERS: Registry[Optimizer] = Registry("optimizer")
OPTIMIZERS.register("adamw", Optimizer("AdamW", 3e-3))
OPTIMIZERS.register("sgd", Optimizer("SGD", 0.05, {"momentum": 0.9, "nesterov": True}))  # the papers' (and torchvision's) SGD
# Measured (`edgeexit train`, eenet resnet20, full.onnx accuracy on test; benchmarks/results/optimizer_choice.json):
# digits (1,258 training images, 8 epochs) adamw 0.9888 vs sgd 0.9740; 6,000 Fashion-MNIST images (30 epochs,
# basic) adamw 0.8880 vs sgd 0.8974; all 42,000 (15 epochs, none) adamw 0.9219 vs sgd 0.9303. sgd from the smallest
# set where it measured better; between 1,258 and 6,000 images nothing was measured.
SGD_FROM_IMAGES = 6000


def default_optimizer(images: int) -> str:
    """The optimizer `train --optimizer` defaults to for a training split of `images` images (measured, see above)."""
    return "sgd" if images >= SGD_FROM_IMAGES else "adamw"


PLACEMENT_COSTS = ("macs", "latency")  # what placement schemes target: MACs, or latency measured here (export.cut_latency)
SCHEDULES = ("joint", "mixed")  # mixed: EENets' backbone-first schedule (TrainSpec.schedule)
MIXED_BACKBONE_SHARE = 0.5  # mixed: the share of the epochs that train the backbone and final classifier alone


def parse_distill(value: str | None) -> tuple[float, float] | None:
    """`--distill T,ALPHA` as (temperature, alpha); None for None, "" or "off"; ConfigError on anything else."""
    if value is None or str(value).strip().lower() in ("", "off"):
        return None
    parts = str(value).split(",")
    try:
        temperature, alpha = (float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--distill takes T,ALPHA (e.g. 3,0.5) or off, got {value!r}") from None
    if not (0 < temperature < float("inf")) or not (0 <= alpha < float("inf")):
        raise ConfigError(f"--distill needs a temperature > 0 and alpha >= 0 (finite), got {value!r}")
    return temperature, alpha


@dataclass
class TrainSpec:
    """One training run: every `edgeexit train` / `pretrain` option with its default (the CLI reads them from here).

    None means "the method's" (exit_type, loss, head_lr, warmup_loss), "the optimizer's" (lr),
    "the data set's" (input_size, flip) or "measured" (augment: train.augment.default_augment; optimizer:
    default_optimizer, resolved with lr and head_lr by with_optimizer).
    workflows.train and train.data.training_splits fill them in; model.pt records the result.
    """

    data: str = DEFAULT_DATA
    data_dir: str | None = None
    download: bool = False
    input_size: int | None = None
    backbone: str = "resnet20"
    backbone_args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of its constructor
    method: str = "eenet"
    exit_type: str | None = None
    num_exits: int | None = None  # None: the method's (Method.num_exits)
    placement: str | None = None  # None: the method's (Method.placement)
    placement_cost: str = "macs"
    exit_at: str | None = None  # comma-separated cut names (overrides placement)
    loss: str | None = None
    lam: float = 1.0
    distill: str | None = None  # "T,ALPHA" or "off" (parse_distill); None: the method's
    epochs: int = 10
    batch_size: int = 64
    optimizer: str | None = None
    lr: float | None = None
    head_lr: float | None = None  # exit heads; None: the method's share of lr (Method.head_lr_scale)
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    schedule: str = "joint"
    augment: str | None = None
    flip: bool | None = None
    warmup_epochs: int = 1
    warmup_loss: str | None = None  # the method's (not an option)
    threshold: float | None = None
    seed: int = 0
    weights: str | None = None
    branch_channels: int | None = None
    branch_depth: int | None = None
    beta: float | list[float] | None = None
    device: str = "auto"  # auto|cpu|cuda|cuda:N|mps (edgeexit.train.hardware)
    precision: str = "32"  # 32|bf16|16-mixed
    num_workers: int = 0  # DataLoader worker processes per training process
    checkpoint_dir: str | None = None  # a checkpoint after every epoch goes here
    resume: bool = False  # continue from checkpoint_dir's checkpoint when there is one

    def check(self) -> "TrainSpec":
        """ConfigError for a value no run can use, before any data is read."""
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if self.num_workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {self.num_workers}")
        if self.resume and not self.checkpoint_dir:
            raise ConfigError("--resume needs --checkpoint-dir DIR (where the checkpoint is)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.placement_cost not in PLACEMENT_COSTS:
            raise ConfigError(f"unknown placement cost '{self.placement_cost}'; choose from: {', '.join(PLACEMENT_COSTS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule '{self.schedule}'; choose from: {', '.join(SCHEDULES)}")
        if self.optimizer is not None:
            OPTIMIZERS.get(self.optimizer)
        parse_distill(self.distill)
        return self

    @property
    def learning_rate(self) -> float:
        """lr, or the optimizer's default (once the optimizer is resolved: with_optimizer)."""
        if self.lr is not None:
            return self.lr
        if self.optimizer is None:
            raise ValueError("the optimizer is chosen from the training split's size: resolve it with with_optimizer first")
        return OPTIMIZERS.get(self.optimizer).lr

    def with_optimizer(self, images: int, head_lr_scale: float = 1.0) -> "TrainSpec":
        """The spec with optimizer, lr and head_lr resolved for a training split of `images` images (set ones kept)."""
        optimizer = self.optimizer or default_optimizer(images)
        lr = self.lr if self.lr is not None else OPTIMIZERS.get(optimizer).lr
        return replace(self, optimizer=optimizer, lr=lr, head_lr=self.head_lr if self.head_lr is not None else head_lr_scale * lr)

    @property
    def backbone_epochs(self) -> int:
        """Epochs at the start that train the backbone alone (the mixed schedule; 0 for joint)."""
        return int(round(self.epochs * MIXED_BACKBONE_SHARE)) if self.schedule == "mixed" else 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRETRAIN = TrainSpec(optimizer="sgd")  # `edgeexit pretrain`: a plain backbone, the papers' SGD
