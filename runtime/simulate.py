"""The cascade replayed in numpy from stored per-exit outputs: what trainer, calibrate and bench simulate.

The decisions are the runtime's own Policy objects, so a simulated operating point is what
`CascadeRunner.predict` does at those thresholds.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edgeexit.runtime.policies import Policy


@dataclass(frozen=True)
class Point:
    """One simulated operating point of the cascade."""

    thresholds: tuple[float, ...]
    accuracy: float
    relative_macs: float
    exit_counts: tuple[int, ...]

    def as_dict(self) -> dict:
        return {"thresholds": list(self.thresholds), "accuracy": self.accuracy,
                "relative_macs": self.relative_macs, "exit_counts": list(self.exit_counts)}


class CascadeSimulator:
    """The cascade's exit decisions replayed in numpy from stored per-exit outputs."""

    def __init__(self, policies: Sequence[Policy], exit_outputs: Sequence[dict[str, np.ndarray]],
                 final_logits: np.ndarray, labels: np.ndarray, exit_costs: Sequence[float]) -> None:
        self.policies = list(policies)
        self.exit_outputs = list(exit_outputs)
        self.final_logits = final_logits
        self.labels = labels
        self.costs = np.asarray(exit_costs, dtype=np.float64)
        self.num_classes = final_logits.shape[1]
        self._cache: dict[tuple[float, ...], tuple[np.ndarray, np.ndarray, object]] = {}
        self.evaluated: dict[tuple[float, ...], Point] = {}

    def _decide(self, thresholds: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, object]:
        """(exits, predictions, state) at exit len(thresholds)-1 for every input, cached by prefix."""
        if thresholds not in self._cache:
            k = len(thresholds) - 1
            state = self.policies[0].start(len(self.labels), self.num_classes) if k == 0 else self._decide(thresholds[:-1])[2]
            policy = dataclasses.replace(self.policies[k], threshold=thresholds[k])
            self._cache[thresholds] = policy.decide(self.exit_outputs[k], state)
        return self._cache[thresholds]

    def evaluate(self, thresholds: Sequence[float]) -> Point:
        """Accuracy, relative MACs and exit counts of the cascade at these thresholds."""
        key = tuple(float(t) for t in thresholds)
        if key in self.evaluated:
            return self.evaluated[key]
        n = len(self.labels)
        last = len(self.policies)
        exit_index = np.full(n, last, dtype=np.int64)
        predictions = np.empty(n, dtype=np.int64)
        alive = np.ones(n, dtype=bool)
        state = None
        for k in range(last):
            exits, preds, state = self._decide(key[: k + 1])
            leaving = exits & alive
            exit_index[leaving] = k
            predictions[leaving] = preds[leaving]
            alive &= ~exits
        if alive.any():
            final = dataclasses.replace(self.policies[-1], threshold=key[-1]).final(self.final_logits, state)
            predictions[alive] = final[alive]
        point = Point(key, float((predictions == self.labels).mean()), float(self.costs[exit_index].mean()),
                      tuple(np.bincount(exit_index, minlength=last + 1).tolist()))
        self.evaluated[key] = point
        return point

    def pareto(self) -> list[Point]:
        """Evaluated points no other point beats on both accuracy and MACs, by rising MACs."""
        front, best = [], -1.0
        for point in sorted(self.evaluated.values(), key=lambda p: (p.relative_macs, -p.accuracy)):
            if point.accuracy > best:
                front.append(point)
                best = point.accuracy
        return front


def grid_points(grids: Sequence[np.ndarray], count: int | None = None) -> list[list[float]]:
    """`count` shared operating points (default: the longest grid's length), point i taking from every
    exit's grid the value at the same fraction i / (count - 1) of the way along it."""
    count = count or max(len(g) for g in grids)
    return [[float(g[round(i * (len(g) - 1) / max(count - 1, 1))]) for g in grids] for i in range(count)]
