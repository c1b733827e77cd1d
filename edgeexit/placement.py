"""Exit placement schemes: name -> target fractions of the backbone's cumulative cost.

A scheme turns the number of exits into cost targets; each target picks the candidate
cut point whose cumulative MACs fraction is nearest (each candidate used once).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

from edgeexit.cuts import CutPoint
from edgeexit.runtime.errors import ConfigError

PHI = (1 + math.sqrt(5)) / 2
SCHEMES: dict[str, Callable[[int], list[float]]] = {}


def register_scheme(name: str) -> Callable:
    """Decorator adding a targets(num_exits) function to SCHEMES."""

    def add(fn: Callable[[int], list[float]]) -> Callable[[int], list[float]]:
        SCHEMES[name] = fn
        return fn

    return add


@register_scheme("pareto")
def pareto(num_exits: int) -> list[float]:
    """Pareto 80/20: each exit at 20% of the cost left after the previous one... from the end."""
    return sorted(1 - 0.8 ** (i + 1) for i in range(num_exits))


@register_scheme("golden")
def golden(num_exits: int) -> list[float]:
    """Golden ratio: exit i at 1/phi^(N-i) of the total cost."""
    return [PHI ** -(num_exits - i) for i in range(num_exits)]


@register_scheme("fine")
def fine(num_exits: int) -> list[float]:
    """Fine: exits packed early, 5% of the cost apart."""
    return [0.05 * (i + 1) for i in range(num_exits)]


@register_scheme("linear")
def linear(num_exits: int) -> list[float]:
    """Linear: evenly spaced in cost."""
    return [(i + 1) / (num_exits + 1) for i in range(num_exits)]


@register_scheme("quadratic")
def quadratic(num_exits: int) -> list[float]:
    """Quadratic: spacing grows with the square of the exit index."""
    return [((i + 1) / (num_exits + 1)) ** 2 for i in range(num_exits)]


def place_exits(scheme: str, num_exits: int, candidates: Sequence[CutPoint]) -> list[CutPoint]:
    """Pick `num_exits` candidate cut points by `scheme`'s cost targets, in network order."""
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown placement scheme '{scheme}'; choose from: {', '.join(SCHEMES)}")
    if num_exits < 1:
        raise ConfigError(f"--num-exits must be >= 1, got {num_exits}")
    if num_exits > len(candidates):
        raise ConfigError(f"{num_exits} exits asked but the backbone has only {len(candidates)} cut points")
    free = list(candidates)
    chosen = []
    for target in SCHEMES[scheme](num_exits):
        best = min(free, key=lambda p: abs(p.fraction - target))
        free.remove(best)
        chosen.append(best)
    return sorted(chosen, key=lambda p: candidates.index(p))
