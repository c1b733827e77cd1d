"""Exit-head registry: name -> module taking a feature map and returning named outputs.

Every exit returns a tuple in the order of its `outputs` attribute (e.g. logits then
confidence_logit); the exporter writes them as the stage's exit outputs under those roles,
and the runtime's policies read them by role.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from edgeexit.errors import ConfigError
from edgeexit.registry import Registry

EXITS: Registry[Callable[..., nn.Module]] = Registry("exit type")



# Starting bias of every confidence branch: sigmoid(-2) = 0.12, so a new head begins by sending
# inputs on and has to learn which ones may leave, instead of starting at 0.5 and drifting to 1.
CONFIDENCE_BIAS_INIT = -2.0


class ConfidenceExit(nn.Module):
    """EENets exit block: a trunk, then a softmax (classifier) branch and a sigmoid confidence branch.

    Each branch is one linear layer on the trunk's features, as in the paper. Both return
    pre-activation values: class logits, and the confidence *logit* z (the confidence is
    sigmoid(z)). Losses use z through logsigmoid and the runtime compares z with logit(T) in
    float64, so a float32 sigmoid never rounds confident inputs to a tie at 1.0.
    """

    outputs: tuple[str, ...] = ("logits", "confidence_logit")

    def __init__(self, trunk: nn.Module, features: int, num_classes: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.classifier = nn.Linear(features, num_classes)
        self.confidence = nn.Linear(features, 1)
        nn.init.constant_(self.confidence.bias, CONFIDENCE_BIAS_INIT)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.classifier(h), self.confidence(h)


@EXITS.register("plain")
def plain_exit(feature_shape: Sequence[int], num_classes: int) -> ConfidenceExit:
    """EENets Plain: the feature map flattened straight into both branches."""
    channels, height, width = feature_shape
    return ConfidenceExit(nn.Flatten(1), channels * height * width, num_classes)


@EXITS.register("pool")
def pool_exit(feature_shape: Sequence[int], num_classes: int) -> ConfidenceExit:
    """EENets Pool: global average pooling, then both branches."""
    return ConfidenceExit(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)), feature_shape[0], num_classes)


@EXITS.register("bnpool")
def bnpool_exit(feature_shape: Sequence[int], num_classes: int) -> ConfidenceExit:
    """EENets Bnpool as the PTEENet fork builds it: batch norm and ReLU (the EENets original has no ReLU), pooling, both branches."""
    channels = feature_shape[0]
    trunk = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    return ConfidenceExit(trunk, channels, num_classes)


class ExclusionExit(nn.Module):
    """Class-exclusion head (Wang et al. 2023): global average pooling, then one logit per class.

    Output role "exclusion_logits": z_c per class c; s_c = sigmoid(z_c) is trained towards 1
    for the input's class and 0 for the others (BCE with logits), and the runtime's exclusion
    policy removes classes with low s_c. One Linear over the pooled features is the authors'
    head with pooling size e = 1 (each class has its own weight row). No class logits: the
    final classifier decides among the classes left in play.
    """

    outputs: tuple[str, ...] = ("exclusion_logits",)

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.scores = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.scores(self.pool(x)),)


@EXITS.register("exclusion")
def exclusion_exit(feature_shape: Sequence[int], num_classes: int) -> ExclusionExit:
    """Class-exclusion head on a feature map of `feature_shape` channels."""
    return ExclusionExit(feature_shape[0], num_classes)


@EXITS.register("branch")
def branch_exit(feature_shape: Sequence[int], num_classes: int, channels: int | None = None, depth: int = 2) -> ConfidenceExit:
    """PTEENet branch: `depth` conv3x3-BN-ReLU blocks of `channels` (default: the cut's), pooling, both heads.

    The conv blocks give a branch the capacity a frozen backbone's raw features need; the
    authors' code uses two blocks at the cut's own width (its exit type "conv2"), the default.
    """
    width = channels or feature_shape[0]
    if depth < 0 or width < 1:
        raise ConfigError(f"branch exits need depth >= 0 and channels >= 1, got depth {depth}, channels {channels}")
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Conv2d(width if i else feature_shape[0], width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    trunk = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    return ConfidenceExit(trunk, width if depth else feature_shape[0], num_classes)


def build_exit(name: str, feature_shape: Sequence[int], num_classes: int, **args) -> nn.Module:
    """Construct a registered exit head, with an error listing the valid names."""
    constructor = EXITS.get(name)
    try:
        return constructor(tuple(feature_shape), num_classes, **args)
    except TypeError as exc:
        raise ConfigError(f"bad arguments for exit type '{name}': {exc}") from None
