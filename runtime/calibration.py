"""Calibrating a bundle in one call: `calibrate_bundle(bundle, x, labels, options)`.

The search itself is runtime/calibrate.py (`calibrate`: thresholds, temperatures, policy choice
on stored stage outputs); this module is what `edgeexit calibrate` and the Python API call
around it: the objective parsed from the three options (the one parser), the device profile a
latency budget is predicted with, the runner, the record written into the bundle
(runtime/bundle.py `save_calibration`), and whether cascade.onnx must be rebuilt. The rebuild
itself needs onnx, so the caller does it from the export side (export/cascade_graph.py
`rebuild_cascade`) when `Calibration.needs_rebuild` says so.

A new calibrate option: a field of CalibrationOptions (with its default) and its use in
`calibrate_bundle`; the CLI only parses it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import numpy as np

from edgeexit.errors import ConfigError
from edgeexit.runtime.bundle import save_calibration
from edgeexit.runtime.calibrate import LatencyTarget, Objective, calibrate, check_objective
from edgeexit.runtime.cascade import CascadeRunner
from edgeexit.runtime.graph import auto_engine
from edgeexit.runtime.latency import DEFAULT_PERCENTILE, calibration_profile
from edgeexit.runtime.manifest import Manifest
from edgeexit.runtime.robust import RobustSettings

OBJECTIVE_OPTIONS = (("target_drop", "--target-drop POINTS"), ("budget", "--budget FRACTION"), ("latency", "--latency-budget MS"))


def parse_objective(target_drop: float | None = None, budget: float | None = None, latency_budget: float | None = None,
                    required: bool = True, allowed: Sequence[str] = ("target_drop", "budget", "latency")) -> Objective | None:
    """The objective from its options (the one parser): exactly one of those in `allowed` given, checked;
    None when none is given and `required` is False."""
    values = {"target_drop": target_drop, "budget": budget, "latency": latency_budget}
    given = [(kind, value) for kind, value in values.items() if value is not None]
    names = [name for kind, name in OBJECTIVE_OPTIONS if kind in allowed]
    if len(given) > 1 or (required and not given) or any(kind not in allowed for kind, _ in given):
        raise ConfigError(f"give {'exactly' if required else 'at most'} one of {', '.join(names[:-1])} or {names[-1]}")
    return check_objective(given[0]) if given else None


@dataclasses.dataclass(frozen=True)
class CalibrationOptions:
    """What to calibrate for, besides the bundle and the data: `edgeexit calibrate`'s options, parsed."""

    objective: Objective
    data: dict = dataclasses.field(default_factory=dict)  # what the data was ({"name", "split"}), for the record
    profile: str | None = None  # device profile name (None: this host's, see latency.calibration_profile)
    percentile: str = DEFAULT_PERCENTILE  # what a latency budget bounds (latency.PERCENTILES)
    threads: int | None = None
    beta: dict | None = None  # class exclusion: fixed policy args ({"beta": B or [B1, ...]}) instead of searching beta
    policy: str | None = None  # None: the bundle's own; a name; or "auto"
    ensemble: str | None = None  # ensemble at deferral (policies.ensemble_choices); None: as `policy` decides
    robust: RobustSettings | None = None  # hold the target under these corruptions too
    confidence: float | None = None  # an accuracy-drop target holds at this level (calibrate.check_confidence)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What calibration chose and wrote: the typed view of the record stored under the manifest's "calibration".

    `chosen` is the operating point as measured on the calibration data (accuracy, relative
    MACs, exit counts, and the predicted latency when a profile was used); `record` is the whole
    stored record (curve, Pareto front, search, per-policy candidates, robust sets, ...).
    `needs_rebuild`: cascade.onnx compiled in the old policies and was removed; the stage chain
    runs until it is rebuilt (export/cascade_graph.py `rebuild_cascade`, which needs onnx).
    """

    manifest: Manifest
    objective: dict
    policy: str
    thresholds: tuple[float, ...]
    temperatures: tuple[float, ...]
    betas: tuple[float, ...] | None
    chosen: dict
    met: bool
    reference_accuracy: float
    record: dict
    needs_rebuild: bool = False

    @classmethod
    def of(cls, manifest: Manifest, record: dict, needs_rebuild: bool = False) -> "Calibration":
        """The typed view of a stored record (as `calibrate` returns it and `save_calibration` writes it)."""
        chosen = record["chosen"]
        betas = chosen.get("betas")
        return cls(manifest, dict(record["objective"]), record["policy"], tuple(float(t) for t in chosen["thresholds"]),
                   tuple(float(t) for t in record["temperatures"]), None if betas is None else tuple(float(b) for b in betas),
                   dict(chosen), bool(chosen["met"]), float(record["reference_accuracy"]), record, needs_rebuild)


def calibrate_bundle(bundle: str | os.PathLike, x: np.ndarray, labels: np.ndarray, options: CalibrationOptions,
                     progress: Callable[[str], None] = lambda message: None) -> Calibration:
    """Choose the bundle's exit policy, thresholds and temperatures for `options` on (x, labels) and write them in."""
    runner = CascadeRunner(bundle, threads=options.threads, policy_args=options.beta)
    kind, value = options.objective
    profile = calibration_profile(runner.manifest, options.profile, kind == "latency", auto_engine(runner.manifest),
                                  options.threads, runner.device)  # the engine `run` picks
    latency = None if profile is None else LatencyTarget(profile, options.percentile)
    if kind == "latency":
        latency.check_budget(value)
    record = calibrate(runner, x, labels, options.objective, options.data, progress, latency, options.policy,
                       search_beta=options.beta is None, robust=options.robust, ensemble=options.ensemble,
                       confidence=options.confidence)
    if options.beta is not None and record["policy"] == "exclusion":
        record["chosen"]["betas"] = [p.args["beta"] for p in runner.policies]
    had_graph = runner.manifest.cascade is not None
    manifest = save_calibration(bundle, record)
    return Calibration.of(manifest, record, needs_rebuild=had_graph and manifest.cascade is None)
