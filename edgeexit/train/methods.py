"""Training-method registry: name -> the defaults that define a method (exit type, loss, policy)."""
from __future__ import annotations

from dataclasses import dataclass

from edgeexit.registry import Registry
from edgeexit.runtime.manifest import PolicySpec
from edgeexit.runtime.policies import ExclusionPolicy


@dataclass(frozen=True)
class Method:
    """What `--method NAME` sets: exit head, loss (and warm-up loss), the exit policy written into
    model.pt and the bundle, and whether the backbone is frozen."""

    name: str
    exit_type: str
    loss: str
    policy: PolicySpec
    frozen_backbone: bool = False
    warmup_loss: str | None = None
    head_lr_scale: float = 1.0  # exit heads' learning rate over the backbone's (whatever the optimizer)
    distill: str = "off"  # self-distillation "T,ALPHA" (config.parse_distill) unless --distill says otherwise
    num_exits: int = 2  # unless --num-exits / --exit-at say otherwise
    placement: str = "pareto"  # unless --placement / --exit-at say otherwise
    summary: str = ""


METHODS: Registry[Method] = Registry("method")
for _method in (
    # confidence heads at a third of the backbone's rate (adamw: 1e-3, the EENets authors' rate): at the backbone's
    # 3e-3 their logits ran to 130-240. A scale, not a rate, so that sgd's 0.05 gives the heads 0.017, not 1e-3.
    # Loss v4, not the paper's v2: under v2 an exit's classifier learns only through its confidence h, and once the
    # final classifier is better h -> 0 and the exit dies (digits, resnet20, 10 epochs: exit classifiers at 0.08 and
    # 0.34 accuracy, nothing left early at any threshold; v4: 0.48 and 0.83). Fashion-MNIST (resnet20, 20k images):
    # v4 gave 0.516 of the MACs for a 0.43-point loss vs v2's 0.598 for 0.28 (max-softmax, calibrated on val).
    Method(name="eenet", exit_type="pool", loss="v4", policy=PolicySpec("confidence", 0.5), warmup_loss="v0", head_lr_scale=1 / 3,
           summary="EENets: exit blocks with confidence branches, cost-aware loss"),
    # Exits spread over the whole depth, as the authors place theirs (after every layer or stage, the last one late):
    # an exclusion head needs features that can rule classes out, and the early GAP heads of a CIFAR ResNet cannot
    # (digits, resnet20, 8 epochs, 0.5-point tolerance: pareto 2 exits at 0.24/0.44 of the MACs kept 0.99 of them;
    # layer1.2/2.1/2.2/3.0 0.68; linear 3 exits, benchmarks/README.md).
    Method(name="exclusion", exit_type="exclusion", loss="exclusion", policy=PolicySpec("exclusion", 0.0, {"beta": ExclusionPolicy.default_beta}),
           num_exits=3, placement="linear",
           summary="Class exclusion: per-class exclusion heads, exit when one class is left"),
    Method(name="pteenet", exit_type="branch", loss="pteenet", policy=PolicySpec("confidence", 0.5), frozen_backbone=True,
           warmup_loss="pteenet_v0",
           summary="PTEENet: conv branches with confidence heads post-trained on a frozen pre-trained backbone"),
):
    METHODS.register(_method.name, _method)


def get_method(name: str) -> Method:
    """Look up a method by name, with an error listing the valid names."""
    return METHODS.get(name)
