"""Training-method registry: name -> the defaults that define a method (exit type, loss, policy)."""
from __future__ import annotations

from dataclasses import dataclass

from edgeexit.runtime.errors import ConfigError


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


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add a method to METHODS."""
    METHODS[method.name] = method
    return method


register_method(
    Method("eenet", "pool", "v2", "confidence", 0.5, summary="EENets: exit blocks with confidence branches, cost-aware loss")
)


def get_method(name: str) -> Method:
    """Look up a method by name, with an error listing the valid names."""
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; choose from: {', '.join(METHODS)}")
    return METHODS[name]
