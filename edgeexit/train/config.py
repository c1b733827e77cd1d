"""Configuration dataclasses: what model.pt records and what `edgeexit train` takes."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from edgeexit.runtime.manifest import PolicySpec


@dataclass
class ModelConfig:
    """Everything needed to rebuild an exit-augmented model from its state_dict."""

    backbone: str = "resnet20"
    backbone_args: dict[str, Any] = field(default_factory=dict)
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


@dataclass
class TrainConfig:
    """Optimization settings of one training run."""

    data: str = "digits"
    data_dir: str | None = None
    download: bool = False
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    head_lr: float | None = None  # exit heads; None: the method's (Method.head_lr), else lr
    weight_decay: float = 5e-4
    loss: str = "v2"
    lam: float = 1.0
    warmup_epochs: int = 1
    warmup_loss: str | None = None
    seed: int = 0
    num_workers: int = 0  # DataLoader worker processes per training process
    device: str = "auto"  # auto|cpu|cuda|cuda:N|mps (edgeexit.train.hardware)
    precision: str = "32"  # 32|bf16|16-mixed
    checkpoint_dir: str | None = None  # a checkpoint after every epoch goes here
    resume: bool = False  # continue from checkpoint_dir's checkpoint when there is one
