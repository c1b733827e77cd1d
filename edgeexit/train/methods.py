"""Training-method registry: name -> the defaults that define a method (exit type, loss, policy)."""
from __future__ import annotations

from dataclasses import dataclass, field

from edgeexit.errors import ConfigError


@dataclass(frozen=True)
class Method:
    """What `--method NAME` sets: exit head, loss, runtime policy, and whether the backbone is frozen."""

    name: str
    exit_type: str
    loss: str
    policy: str
    threshold: float
    frozen_backbone: bool = False
    summary: str = ""
    warmup_loss: str | None = None
    policy_args: dict = field(default_factory=dict)
    head_lr: float | None = None  # exit heads' learning rate; None: the backbone's


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add a method to METHODS."""
    METHODS[method.name] = method
    return method


register_method(
    # confidence heads at 1e-3 (the EENets authors' rate): at the backbone's 3e-3 their logits ran to 130-240
    Method("eenet", "pool", "v2", "confidence", 0.5, warmup_loss="v0", head_lr=1e-3,
           summary="EENets: exit blocks with confidence branches, cost-aware loss")
)

register_method(
    Method(
        "exclusion", "exclusion", "exclusion", "exclusion", 0.0,
        summary="Class exclusion: per-class exclusion heads, exit when one class is left",
        policy_args={"beta": 0.5},
    )
)

register_method(
    Method("pteenet", "branch", "pteenet", "confidence", 0.5, frozen_backbone=True, warmup_loss="pteenet_v0",
           summary="PTEENet: conv branches with confidence heads post-trained on a frozen pre-trained backbone")
)


def get_method(name: str) -> Method:
    """Look up a method by name, with an error listing the valid names."""
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; choose from: {', '.join(METHODS)}")
    return METHODS[name]
