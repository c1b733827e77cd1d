"""Exit policies: pure numpy rules that decide, from an exit's outputs, which inputs leave.

Each policy is one entry in POLICIES. A policy may carry per-input state from stage to
stage (the class mask of class exclusion); the cascade keeps that state aligned with the
surviving inputs by indexing it like the batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from edgeexit.runtime.errors import ConfigError


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    expo = np.exp(shifted)
    return expo / expo.sum(axis=1, keepdims=True)


@dataclass
class Policy:
    """Base policy: `decide` returns (exits, predictions, state) for one exit's outputs."""

    threshold: float
    args: dict = field(default_factory=dict)

    name: ClassVar[str] = ""
    roles: ClassVar[tuple[str, ...]] = ("logits",)
    threshold_range: ClassVar[tuple[float, float]] = (0.0, 1.0)

    def __post_init__(self) -> None:
        self.threshold = self.check_threshold(self.threshold)

    @classmethod
    def check_threshold(cls, value: float) -> float:
        """Return the threshold as float or raise ConfigError if it is outside the valid range."""
        low, high = cls.threshold_range
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{cls.name} threshold must be a number, got {value!r}") from None
        if not (low <= value <= high):
            raise ConfigError(f"{cls.name} threshold must be in [{low}, {high}], got {value}")
        return value

    def start(self, n: int, num_classes: int) -> np.ndarray | None:
        """Per-input state at the first stage (None for stateless policies)."""
        return None

    def scores(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """The per-input number compared with the threshold."""
        raise NotImplementedError

    def decide(self, outputs: dict[str, np.ndarray], state: np.ndarray | None):
        """Which inputs exit here, their predictions, and the state passed on."""
        exits = self.scores(outputs) >= self.threshold
        return exits, outputs["logits"].argmax(axis=1), state

    def final(self, logits: np.ndarray, state: np.ndarray | None) -> np.ndarray:
        """Predictions at the final stage for inputs that never exited."""
        return logits.argmax(axis=1)


@dataclass
class ConfidencePolicy(Policy):
    """EENets / PTEENet: exit when the learned confidence head says >= T."""

    name: ClassVar[str] = "confidence"
    roles: ClassVar[tuple[str, ...]] = ("logits", "confidence")

    def scores(self, outputs):
        return outputs["confidence"].reshape(-1)


@dataclass
class MaxSoftmaxPolicy(Policy):
    """SDN-style baseline: exit when the top softmax probability >= T."""

    name: ClassVar[str] = "max_softmax"

    def scores(self, outputs):
        return softmax(outputs["logits"]).max(axis=1)


@dataclass
class EntropyPolicy(Policy):
    """BranchyNet: exit when the softmax entropy (nats) <= T."""

    name: ClassVar[str] = "entropy"
    threshold_range: ClassVar[tuple[float, float]] = (0.0, math.inf)

    def scores(self, outputs):
        probs = softmax(outputs["logits"])
        return -(probs * np.log(np.clip(probs, 1e-12, None))).sum(axis=1)

    def decide(self, outputs, state):
        exits = self.scores(outputs) <= self.threshold
        return exits, outputs["logits"].argmax(axis=1), state


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (ConfidencePolicy, MaxSoftmaxPolicy, EntropyPolicy)
}


def get_policy(kind: str) -> type[Policy]:
    """Look up a policy class by name, with an error listing the valid names."""
    try:
        return POLICIES[kind]
    except KeyError:
        raise ConfigError(f"unknown exit policy '{kind}'; choose from: {', '.join(sorted(POLICIES))}") from None
