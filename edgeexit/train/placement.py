"""EENets exit placement schemes: name -> cost targets on the backbone's cumulative-cost curve.

A scheme turns the number of exits N into N targets, fractions of the full backbone MACs
(Demir & Akbas, EENets, sec. "Distribution of early-exit blocks"; targets as in the
authors' eenets.pytorch `set_thresholds`). Exit i goes at the first candidate cut point,
after exit i-1, whose cumulative MACs reach target i -- the paper adds an exit block after
the first residual block whose running cost passes the threshold. A target no remaining
cut point reaches is an error, as in the paper's code.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

from edgeexit.train.cuts import CutPoint
from edgeexit.errors import ConfigError
from edgeexit.registry import Registry

PHI = (1 + math.sqrt(5)) / 2
SCHEMES: Registry[Callable[[int], list[float]]] = Registry("placement scheme")



@SCHEMES.register("pareto")
def pareto(num_exits: int) -> list[float]:
    """Pareto 80/20: exit i at 1 - 0.8^(i+1), each exit 20% further into the cost left."""
    return [1 - 0.8 ** (i + 1) for i in range(num_exits)]


@SCHEMES.register("golden")
def golden(num_exits: int) -> list[float]:
    """Golden ratio: exit i at phi^(i-N), the last one at 1/phi of the cost."""
    return [PHI ** (i - num_exits) for i in range(num_exits)]


@SCHEMES.register("fine")
def fine(num_exits: int) -> list[float]:
    """Fine: exit i at 1 - 0.95^(i+1), exits packed early about 5% of the cost apart."""
    return [1 - 0.95 ** (i + 1) for i in range(num_exits)]


@SCHEMES.register("linear")
def linear(num_exits: int) -> list[float]:
    """Linear: exit i at (i+1)/(N+1), evenly spaced in cost."""
    return [(i + 1) / (num_exits + 1) for i in range(num_exits)]


@SCHEMES.register("quadratic")
def quadratic(num_exits: int) -> list[float]:
    """Quadratic: exit i at ((i+1)/(N+1))^2, gaps growing with the exit index (denser early)."""
    return [((i + 1) / (num_exits + 1)) ** 2 for i in range(num_exits)]


def scheme_targets(scheme: str, num_exits: int) -> list[float]:
    """A scheme's cost targets for `num_exits` exits, with errors listing the valid choices."""
    targets = SCHEMES.get(scheme)
    if num_exits < 1:
        raise ConfigError(f"--num-exits must be >= 1, got {num_exits}")
    return targets(num_exits)


def check_exit_count(num_exits: int, candidates: Sequence[CutPoint]) -> None:
    """One-line error when more exits are asked than the backbone has cut points."""
    if num_exits > len(candidates):
        raise ConfigError(
            f"{num_exits} exits asked but the backbone has only {len(candidates)} cut points "
            f"({', '.join(p.name for p in candidates)}); use --num-exits 1..{len(candidates)}"
        )


def place_exits(scheme: str, num_exits: int, candidates: Sequence[CutPoint]) -> list[CutPoint]:
    """Pick `num_exits` candidate cut points by `scheme`'s cost targets, in network order."""
    targets = scheme_targets(scheme, num_exits)
    check_exit_count(num_exits, candidates)
    chosen: list[CutPoint] = []
    for index, target in enumerate(targets):
        start = candidates.index(chosen[-1]) + 1 if chosen else 0
        point = next((p for p in candidates[start:] if p.fraction >= target), None)
        if point is None:
            after = chosen[-1].name if chosen else "the input"
            raise ConfigError(
                f"placement '{scheme}' cannot place exit {index + 1} of {num_exits}: no cut point after {after} "
                f"reaches its cost target {target:.3f} (last: {candidates[-1].name} at {candidates[-1].fraction:.3f}); "
                "use fewer exits or --exit-at"
            )
        chosen.append(point)
    return chosen
