"""Robust calibration: thresholds that hold on the calibration data and on it under named corruptions.

The bundle runs over the calibration inputs once per corruption family (CORRUPTIONS, applied to
the raw images behind the model-ready inputs), every exit's outputs kept. A RobustSimulator
replays the cascade on all those sets at the same thresholds; a point's accuracy is the clean
reference accuracy minus the worst drop over the sets, each drop measured against the final
stage on that same set (the chained stages compute full.onnx, `edgeexit verify` checks it) less
the set's slack (points of extra drop the user allows under that corruption, 0 by default), and
its MACs and exit counts are the clean set's. The calibration search runs on it unchanged: a
drop target then holds on every set, and among those points the one cheapest on clean data wins.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from edgeexit.errors import ConfigError
from edgeexit.runtime.cascade import CascadeRunner
from edgeexit.runtime.corruptions import DEFAULT_SEVERITY, corrupt_model_ready
from edgeexit.runtime.policies import Policy
from edgeexit.runtime.simulate import CascadeSimulator, Point, pareto_front

CLEAN = "clean"


@dataclass(frozen=True)
class OutputSet:
    """One data set's stored cascade outputs: every exit's outputs, the final logits, the labels."""

    name: str
    exit_outputs: list[dict[str, np.ndarray]]
    final_logits: np.ndarray
    labels: np.ndarray
    slack_points: float = 0.0  # drop beyond the target this set may show

    @property
    def reference_accuracy(self) -> float:
        """Accuracy of the final stage (full.onnx) on this set: what its drop is measured against."""
        return float((self.final_logits.argmax(axis=1) == self.labels).mean())


@dataclass(frozen=True)
class RobustSettings:
    """Which corruption families robust calibration holds the target on, at which severity and seed."""

    families: tuple[str, ...]
    severity: int = DEFAULT_SEVERITY
    seed: int = 0
    slack_points: float = 0.0  # extra drop allowed on each corrupted set beyond the target

    def __post_init__(self) -> None:
        if not self.families:
            raise ConfigError("--robust needs at least one corruption family")
        if not 0.0 <= self.slack_points <= 100.0:
            raise ConfigError(f"--shift-slack is in accuracy points, 0 to 100: got {self.slack_points:g}")

    def to_dict(self) -> dict:
        return {"families": list(self.families), "severity": self.severity, "seed": self.seed,
                "slack_points": self.slack_points}


def corrupted_sets(runner: CascadeRunner, x: np.ndarray, labels: np.ndarray, settings: RobustSettings,
                   progress: Callable[[str], None] = lambda message: None) -> list[OutputSet]:
    """The stored outputs of (x, labels) under each family of `settings` (family i seeded with seed + i)."""
    spec = runner.manifest.input_spec
    sets = []
    for i, family in enumerate(settings.families):
        shifted = corrupt_model_ready(x, spec.mean, spec.std, family, settings.severity, settings.seed + i)
        outputs, final = runner.stage_outputs(shifted)
        sets.append(OutputSet(family, outputs, final, labels, settings.slack_points))
        progress(f"corruption {family} (severity {settings.severity}): full.onnx accuracy {sets[-1].reference_accuracy:.4f}")
    return sets


class RobustSimulator:
    """Several data sets simulated at the same thresholds (the first is the clean one); see the module docstring."""

    def __init__(self, policies: Sequence[Policy], sets: Sequence[OutputSet], exit_costs: Sequence[float]) -> None:
        self.sets = list(sets)
        self.sims = [CascadeSimulator(policies, s.exit_outputs, s.final_logits, s.labels, exit_costs) for s in self.sets]
        self.references = [s.reference_accuracy for s in self.sets]
        self.evaluated: dict[tuple[float, ...], Point] = {}

    @property
    def clean(self) -> CascadeSimulator:
        return self.sims[0]

    def evaluate(self, thresholds: Sequence[float]) -> Point:
        """The clean point with accuracy replaced by clean reference minus the worst drop (less slack) over the sets, and
        that set's standard error of the drop."""
        key = tuple(float(t) for t in thresholds)
        if key not in self.evaluated:
            points = [sim.evaluate(key) for sim in self.sims]
            drops = [ref - p.accuracy - s.slack_points / 100.0 for ref, p, s in zip(self.references, points, self.sets)]
            worst = int(np.argmax(drops))
            self.evaluated[key] = Point(key, self.references[0] - drops[worst], points[0].relative_macs, points[0].exit_counts,
                                        points[worst].drop_se)
        return self.evaluated[key]

    def pareto(self) -> list[Point]:
        return pareto_front(self.evaluated.values())

    def report(self, thresholds: Sequence[float]) -> dict:
        """Per set at these thresholds: reference (full.onnx) accuracy, cascade accuracy, drop in points, MACs, exits."""
        out = {}
        for data, sim in zip(self.sets, self.sims):
            point = sim.evaluate(thresholds)
            out[data.name] = {"reference_accuracy": data.reference_accuracy, "accuracy": point.accuracy,
                              "drop_points": 100.0 * (data.reference_accuracy - point.accuracy),
                              "relative_macs": point.relative_macs, "exit_counts": list(point.exit_counts)}
        return out


def worst_drop(report: dict) -> float:
    """The largest drop in points over the sets of a RobustSimulator.report."""
    return max(entry["drop_points"] for entry in report.values())
