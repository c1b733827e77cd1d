"""Threshold calibration: choose per-exit thresholds for an accuracy-drop or a MACs-budget target.

The bundle runs once over the calibration data with every exit's outputs kept
(CascadeRunner.stage_outputs); after that the cascade is simulated in numpy with the
runtime's own Policy objects, so what calibration picks is exactly what `run` does, for
every policy in POLICIES (stateful ones such as class exclusion included).

Objectives: an accuracy drop (least MACs within it), a MACs budget (most accurate within
it) or a latency budget in ms (most accurate whose latency, predicted from the exit
histogram and a device profile by `latency.budget_latency`, is within it).

Search (direction-agnostic: it never assumes whether a policy exits above or below T):
1. Candidate grid per exit: GRIDS[policy kind] if registered, else quantiles of the
   policy's score on the calibration data (plus the finite ends of its threshold range),
   else an even grid over a finite threshold range. Exits of the same policy kind share
   one pooled grid so that step 2 is a sweep of one shared threshold, the `--threshold T`
   knob users have at run time.
2. Shared sweep: every grid value applied to all exits; this is the recorded curve.
3. Every combination of the per-exit candidates when there are at most EXHAUSTIVE_POINTS
   of them (two exits, or three with the default grid): the optimum over the grid.
   Beyond that, coordinate descent from the best shared point: per exit, try each of its
   candidates with the other exits fixed, keep the best, repeat until a round changes
   nothing (measured on synthetic outputs with two exits, descent alone missed the grid
   optimum by up to 2 accuracy points in 6 of 21 cases).
   Decisions at exit k depend only on thresholds 0..k (the policy state flows forward),
   so they are cached by that prefix and a pass over a late exit reuses the early ones.
Every evaluated point feeds the Pareto front (accuracy vs relative MACs) stored too.

Before the search, each exit's temperature (logits / T before any softmax) is fitted to the
calibration data by minimizing the NLL (fit_temperature). With a policy choice ("auto", or
a name other than the bundle's), the search runs once per candidate policy and the one
whose chosen point best meets the objective wins; the manifest records policy, thresholds
and temperatures per exit.

Calibrated numbers are measured on the calibration data itself (in-sample): calibrate on
`val`, evaluate on `test`.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
import sys
import time
from typing import Callable, Sequence

import numpy as np

from edgeexit.runtime.cascade import CascadeRunner
from edgeexit.errors import ConfigError
from edgeexit.registry import Registry
from edgeexit.runtime.latency import DEFAULT_PERCENTILE, budget_latency, budget_stat, cheapest_latency
from edgeexit.runtime.profiles import DeviceProfile
from edgeexit.runtime.policies import (ENSEMBLES, NO_ENSEMBLE, ExclusionPolicy, Policy, get_policy, manifest_ensemble,
                                       policies_for, with_ensemble)
from edgeexit.runtime.drift import drift_reference
from edgeexit.runtime.robust import CLEAN, OutputSet, RobustSettings, RobustSimulator, corrupted_sets, worst_drop
from edgeexit.runtime.simulate import CascadeSimulator, Point, fit_ensemble_weights, golden_minimum, grid_points, pareto_front

GRID_SIZE = 41
TEMPERATURE_RANGE = (0.05, 20.0)  # searched in log space; beyond it an exit's logits are useless or one-hot
AUTO = "auto"
MAX_ROUNDS = 4
EXHAUSTIVE_POINTS = 70_000  # 41**3 = 68,921: about a second or two of simulation
Objective = tuple[str, float]  # ("target_drop", points), ("budget", fraction) or ("latency", ms)
GridFn = Callable[[Policy, Sequence[dict[str, np.ndarray]], int], np.ndarray]
GRIDS: Registry[GridFn] = Registry("calibration grid")  # policy kind -> its candidate thresholds


def score_grid(policy: Policy, outputs: Sequence[dict[str, np.ndarray]], size: int = GRID_SIZE) -> np.ndarray:
    """Default candidates: score quantiles over the data, or an even grid over a finite range."""
    low, high = policy.threshold_range
    try:
        scores = np.concatenate([policy.scores(o) for o in outputs]).astype(np.float64)
    except NotImplementedError:  # a policy without a single per-input score (e.g. stateful)
        if not (np.isfinite(low) and np.isfinite(high)):
            raise ConfigError(f"policy '{policy.name}' needs a calibration grid in calibrate.GRIDS") from None
        return np.linspace(low, high, size)
    values = policy.threshold_of(np.quantile(scores, np.linspace(0.0, 1.0, size - 2)))
    ends = [v for v in (low, high) if np.isfinite(v)]
    return np.unique(np.clip(np.concatenate([values, ends]), low, high))


def candidate_grid(policy: Policy, outputs: Sequence[dict[str, np.ndarray]]) -> np.ndarray:
    """The thresholds calibration tries for a policy (a registered grid wins over the default)."""
    grid = GRIDS.get(policy.name) if policy.name in GRIDS else score_grid
    return np.asarray(grid(policy, outputs, GRID_SIZE), dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class LatencyTarget:
    """The device profile a latency budget is predicted with, and what it bounds (latency.PERCENTILES): the mean
    ms per input, or the 95th / 99th percentile of the ms per call."""

    profile: DeviceProfile
    percentile: str = DEFAULT_PERCENTILE
    _cache: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        budget_stat(self.percentile)  # ConfigError for an unknown one

    @property
    def label(self) -> str:
        """What the budget bounds, in words: 'mean ms per input' or 'p95 ms per call'."""
        stat, unit = budget_stat(self.percentile)
        return f"{stat} {unit}"

    def predict(self, point: Point) -> float:
        """The latency the budget bounds, predicted for a point's exit histogram."""
        if point.exit_counts not in self._cache:
            self._cache[point.exit_counts] = budget_latency(self.profile, point.exit_counts, self.percentile)
        return self._cache[point.exit_counts]

    def describe(self) -> dict:
        """The objective's latency entries for the calibration record."""
        percentile = self.percentile if self.percentile == "mean" else int(self.percentile)
        return {"profile": self.profile.key, "percentile": percentile, "bounds": self.label}

    def check_budget(self, budget_ms: float) -> None:
        """ConfigError when no thresholds can meet the budget: it is below the cheapest exit's latency."""
        least = cheapest_latency(self.profile, self.percentile)
        if budget_ms < least:
            raise ConfigError(f"latency budget {budget_ms:g} ms ({self.label}) is below the cheapest exit's on profile "
                              f"{self.profile.key}: every input leaving at exit 0 takes {least:.4g} ms; the minimum budget is "
                              f"{least:.4g} ms")


def check_confidence(level: float | None, objective: Objective) -> float:
    """The one-sided normal quantile z of a confidence level in [0.5, 1) for an accuracy-drop target (0 for None);
    ConfigError otherwise."""
    if level is None:
        return 0.0
    if objective[0] != "target_drop":
        raise ConfigError("--confidence-level bounds an accuracy drop: use it with --target-drop")
    if not 0.5 <= level < 1.0:
        raise ConfigError(f"--confidence-level must be in [0.5, 1), got {level}")
    return statistics.NormalDist().inv_cdf(level)


def objective_key(objective: Objective, reference_accuracy: float,
                  latency: LatencyTarget | None = None, z: float = 0.0) -> Callable[[Point], tuple]:
    """Sort key (smaller is better): constraint violation first, then the objective, then the other metric.

    With z > 0 an accuracy-drop target must hold with the margin z standard errors of the paired drop
    (check_confidence): the drop measured plus the margin within the target."""
    kind, value = objective
    if kind == "target_drop":
        floor = reference_accuracy - value / 100.0
        return lambda p: (max(0.0, floor - p.accuracy_bound(z) - 1e-12), p.relative_macs, -p.accuracy)
    if kind == "latency":
        if latency is None:
            raise ConfigError("a latency budget needs a device profile (--profile NAME)")
        return lambda p: (max(0.0, latency.predict(p) - value - 1e-12), -p.accuracy, latency.predict(p))
    return lambda p: (max(0.0, p.relative_macs - value - 1e-12), -p.accuracy, p.relative_macs)


def shared_grids(policies: Sequence[Policy], outputs: Sequence[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """One candidate grid per exit; exits of the same policy kind share a grid pooled over them."""
    by_kind: dict[str, list[int]] = {}
    for index, policy in enumerate(policies):
        by_kind.setdefault(policy.name, []).append(index)
    grids: list[np.ndarray] = [np.empty(0)] * len(policies)
    for indices in by_kind.values():
        grid = candidate_grid(policies[indices[0]], [outputs[i] for i in indices])
        for i in indices:
            grids[i] = grid
    return grids


def search(sim: CascadeSimulator, grids: Sequence[np.ndarray], key: Callable[[Point], tuple],
           progress: Callable[[str], None]) -> tuple[Point, list[Point]]:
    """Shared sweep, then every grid combination (or per-exit coordinate descent when there are too many);
    returns the chosen point and the sweep curve."""
    curve = [sim.evaluate(thresholds) for thresholds in grid_points(grids)]
    best = min(curve, key=key)
    progress(f"shared sweep: {len(curve)} points, best {describe(best.as_dict())}")
    if math.prod(len(g) for g in grids) <= EXHAUSTIVE_POINTS:
        best = min([best, *(sim.evaluate(t) for t in itertools.product(*grids))], key=key)
        progress(f"every combination of the grids: {describe(best.as_dict())}")
        return best, sorted(curve, key=lambda p: p.relative_macs)
    for round_index in range(MAX_ROUNDS):
        start = best
        for k, grid in enumerate(grids):
            trials = [sim.evaluate([*best.thresholds[:k], t, *best.thresholds[k + 1 :]]) for t in grid]
            best = min([best, *trials], key=key)
        progress(f"refinement round {round_index + 1}: {describe(best.as_dict())}")
        if best == start:
            break
    return best, sorted(curve, key=lambda p: p.relative_macs)


def search_method(grids: Sequence[np.ndarray]) -> str:
    """How `search` explores these grids, for the calibration record."""
    if math.prod(len(g) for g in grids) <= EXHAUSTIVE_POINTS:
        return "shared sweep + every combination of the grids"
    return "shared sweep + per-exit coordinate descent"


def describe(point: dict) -> str:
    """One line of an operating point (Point.as_dict()) for progress output and the CLI."""
    thresholds = ",".join(f"{t:.4g}" for t in point["thresholds"])
    if "betas" in point:
        thresholds += "  betas " + ",".join(f"{b:.2f}" for b in point["betas"])
    bounds = f" ({point['predicted_latency_bounds']})" if "predicted_latency_bounds" in point else ""
    latency = f"  predicted latency {point['predicted_latency_ms']:.3f} ms{bounds}" if "predicted_latency_ms" in point else ""
    return (f"thresholds {thresholds}  accuracy {point['accuracy']:.4f}  relative MACs {point['relative_macs']:.3f}"
            f"{latency}  exits {point['exit_counts']}")


def stderr_progress(message: str) -> None:
    """Progress lines on stderr (runtime code has no tqdm)."""
    print(message, file=sys.stderr, flush=True)


def check_objective(objective: Objective, max_budget: float = 1.0) -> Objective:
    """ConfigError unless the objective is a drop >= 0 points or a MACs budget in (0, max_budget] (relative to
    full.onnx; a model cascade's stages add up to more than its last model, so calibrate allows its full cost)."""
    kind, value = objective
    if kind == "target_drop" and not value >= 0:
        raise ConfigError(f"--target-drop must be >= 0 percentage points, got {value}")
    if kind == "budget" and not (0 < value <= max_budget or math.isclose(value, max_budget)):
        raise ConfigError(f"--budget must be a fraction of the full model's MACs in (0, {max_budget:g}], got {value}")
    if kind == "latency" and not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"--latency-budget must be a positive number of milliseconds, got {value}")
    if kind not in ("target_drop", "budget", "latency"):
        raise ConfigError(f"unknown calibration objective '{kind}'")
    return objective


def choose_thresholds(
    policies: Sequence[Policy],
    exit_outputs: Sequence[dict[str, np.ndarray]],
    final_logits: np.ndarray,
    labels: np.ndarray,
    exit_costs: Sequence[float],
    objective: Objective,
    progress: Callable[[str], None] = lambda message: None,
    latency: LatencyTarget | None = None,
    shifted: Sequence[OutputSet] = (),
    confidence: float | None = None,
) -> dict:
    """The search on stored outputs: chosen point, curve, Pareto front (the record minus its data).

    With `confidence` (a level, see check_confidence) an accuracy-drop target holds with that margin.

    With `latency`, every point also carries its predicted latency on that profile. With `shifted` (the same
    inputs under corruptions, robust.corrupted_sets), the objective holds on every set (robust.RobustSimulator,
    grids pooled over the sets); curve, front and chosen point stay the clean data's, and the record's
    `robust` entry gives the drop, MACs and exits per set at the chosen thresholds."""
    kind, value = check_objective(objective, max(1.0, exit_costs[-1]))
    z = check_confidence(confidence, objective)
    if kind == "latency" and latency is not None:
        latency.check_budget(value)
    reference = float((final_logits.argmax(axis=1) == labels).mean())
    sets = [OutputSet(CLEAN, list(exit_outputs), final_logits, labels), *shifted]
    sim = RobustSimulator(policies, sets, exit_costs) if shifted else CascadeSimulator(
        policies, exit_outputs, final_logits, labels, exit_costs)
    pooled = [{role: np.concatenate([s.exit_outputs[k][role] for s in sets]) for role in exit_outputs[k]}
              for k in range(len(exit_outputs))]
    grids = shared_grids(policies, pooled)
    key = objective_key(objective, reference, latency, z)
    chosen, curve = search(sim, grids, key, progress)
    met = key(chosen)[0] == 0.0
    if not met:
        progress("warning: no candidate meets the target; chose the closest point")
    robust = {}
    if shifted:
        per_set = sim.report(chosen.thresholds)
        robust = {"robust": {"sets": per_set, "worst_drop_points": worst_drop(per_set), "selection_accuracy": chosen.accuracy,
                             "selection_drop_se": chosen.drop_se}}
        progress("per set at the chosen thresholds: " + "; ".join(
            f"{name} drop {e['drop_points']:.2f} MACs {e['relative_macs']:.3f}" for name, e in per_set.items()))
        sim, curve = sim.clean, [sim.clean.evaluate(p.thresholds) for p in curve]
        chosen = sim.evaluate(chosen.thresholds)

    def entry(point: Point) -> dict:
        if latency is None:
            return point.as_dict()
        return {**point.as_dict(), "predicted_latency_ms": latency.predict(point)}

    return {
        "objective": {kind: value, **(latency.describe() if latency is not None and kind == "latency" else {}),
                      **({} if confidence is None else {"confidence_level": confidence})},
        "reference_accuracy": reference,
        "policies": [p.name for p in policies],
        "search": {"method": search_method(grids), "grid_sizes": [len(g) for g in grids],
                   "evaluated": len(sim.evaluated)},
        "latency_profile": None if latency is None else latency.describe(),
        "curve": [entry(p) for p in curve],
        "pareto": [entry(p) for p in sim.pareto()],
        "chosen": {**entry(chosen), "met": met, **({} if latency is None else {"predicted_latency_bounds": latency.label})},
        **robust,
    }


BETA_STEP = 0.01
BETA_BACKOFF = 2  # steps taken back from the first beta that breaks the tolerance, as the authors do


def with_betas(policies: Sequence[Policy], betas: Sequence[float]) -> list[Policy]:
    """Copies of class-exclusion policies with beta_k set per exit."""
    return [dataclasses.replace(p, args={**p.args, "beta": float(b)}) for p, b in zip(policies, betas)]


def search_betas(
    policies: Sequence[Policy],
    exit_outputs: Sequence[dict[str, np.ndarray]],
    final_logits: np.ndarray,
    labels: np.ndarray,
    exit_costs: Sequence[float],
    tolerance: float,
    progress: Callable[[str], None] = lambda message: None,
    confidence: float | None = None,
) -> dict:
    """Class exclusion's per-exit beta search as its authors run it; returns the calibration record (minus data).

    Exits in order of MACs saved (cheapest first); all betas start at 0 (nothing excluded,
    the final classifier's accuracy is the start). For each exit in turn, the others fixed,
    beta rises from 0.01 in steps of 0.01 while accuracy on the calibration data stays
    above start - tolerance (points); then it backs off BETA_BACKOFF steps from the first
    failing value (when none fails up to 1, beta_k is 1: only the top class survives that exit).
    The thresholds (static floors) are kept as they are.
    """
    if not tolerance >= 0:
        raise ConfigError(f"--target-drop must be >= 0 percentage points, got {tolerance}")
    z = check_confidence(confidence, ("target_drop", tolerance))
    thresholds = [p.threshold for p in policies]
    evaluated: list[Point] = []

    def measure(betas: Sequence[float]) -> Point:
        sim = CascadeSimulator(with_betas(policies, betas), exit_outputs, final_logits, labels, exit_costs)
        point = sim.evaluate(thresholds)
        evaluated.append(point)
        return point

    betas = [0.0] * len(policies)
    start = measure(betas)
    floor = start.accuracy - tolerance / 100.0
    holds = lambda point: point.accuracy_bound(z) > floor  # noqa: E731
    order = sorted(range(len(policies)), key=lambda k: exit_costs[k])
    steps = int(round(1.0 / BETA_STEP))
    for k in order:
        step = 1
        while step <= steps and holds(measure([*betas[:k], step * BETA_STEP, *betas[k + 1 :]])):
            step += 1
        betas[k] = 1.0 if step > steps else max(0, step - BETA_BACKOFF) * BETA_STEP  # no step failed: nothing to back off from
        progress(f"exit {k}: beta {betas[k]:.2f} ({step - 1} steps kept accuracy above {floor:.4f})")
    chosen = measure(betas)
    return {
        "objective": {"target_drop": tolerance, **({} if confidence is None else {"confidence_level": confidence})},
        "reference_accuracy": float((final_logits.argmax(axis=1) == labels).mean()),
        "policies": [p.name for p in policies],
        "search": {"method": "per-exit beta, greedy in order of MACs saved (class-exclusion authors)",
                   "order": order, "step": BETA_STEP, "backoff_steps": BETA_BACKOFF, "evaluated": len(evaluated)},
        "curve": [p.as_dict() for p in sorted(evaluated, key=lambda p: p.relative_macs)],
        "pareto": [p.as_dict() for p in pareto_front(evaluated)],
        "chosen": {**chosen.as_dict(), "betas": betas, "met": holds(chosen) or not any(betas)},
    }


def temperature_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / temperature), in float64."""
    z = logits.astype(np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float((log_norm - z[np.arange(len(labels)), labels]).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, steps: int = 60) -> float:
    """The temperature minimizing the NLL: golden-section search on log T over TEMPERATURE_RANGE.

    The NLL is convex in 1/T, so it has one minimum along log T and the search finds it; at
    the ends of the range the answer is that end.
    """
    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    return math.exp(golden_minimum(lambda log_t: temperature_nll(logits, labels, math.exp(log_t)), low, high, steps))


def candidate_policies(runner: CascadeRunner, choice: str | None) -> list[str]:
    """Policy names to search: the bundle's own (None), one by name, or every score policy its exits can run (auto)."""
    own = runner.manifest.exits[0].policy.kind
    if choice is None:
        return [own]
    roles = set.intersection(*(set(spec.outputs) for spec in runner.manifest.exits))
    runnable = policies_for(roles)
    if choice == AUTO:
        names = policies_for(roles, scored=True)
        return names or [own]
    get_policy(choice)
    if choice not in runnable:
        raise ConfigError(f"--policy {choice} needs exit outputs {sorted(set(get_policy(choice).roles) - roles)}; "
                          f"this bundle's exits can run: {', '.join(runnable)}")
    return [choice]


def candidate_ensembles(runner: CascadeRunner, name: str, policy: str | None, choice: str | None) -> list[str]:
    """Ensembles to search with policy `name`: `choice` (--ensemble), else with --policy auto none and every ensemble
    the policy takes, else the bundle's own when the policy takes it."""
    if choice is not None:
        with_ensemble([get_policy(name)(get_policy(name).default_threshold)], choice)  # ConfigError if it cannot take it
        return [choice]
    takes = get_policy(name).reads_probabilities
    if policy == AUTO:
        return [NO_ENSEMBLE, *(ENSEMBLES if takes else [])]
    own = manifest_ensemble([e.policy for e in runner.manifest.exits])[0]
    return [own if takes else NO_ENSEMBLE]


def calibrate(
    runner: CascadeRunner,
    x: np.ndarray,
    labels: np.ndarray,
    objective: Objective,
    data: dict | None = None,
    progress: Callable[[str], None] = lambda message: None,
    latency: LatencyTarget | None = None,
    policy: str | None = None,
    search_beta: bool = True,
    robust: RobustSettings | None = None,
    ensemble: str | None = None,
    confidence: float | None = None,
) -> dict:
    """Run the bundle once over (x, labels), fit per-exit temperatures, and choose the policy (None: the
    bundle's own; a name; or "auto") and thresholds for `objective`; returns the calibration record.

    Ensembles at deferral (candidate_ensembles; `ensemble` names one) get their per-exit weights fitted
    on (x, labels) first (simulate.fit_ensemble_weights) and compete as candidates "POLICY+ENSEMBLE";
    the record's `ensemble` holds the chosen mode and weights.

    With `robust`, the bundle also runs over x under each corruption family and the objective must hold on
    every set (see choose_thresholds). The record's `drift_reference` (drift.DriftReference) holds the exit
    shares and score quantiles on the clean data at the chosen point, for the runtime's drift guard.

    With `confidence` (a level in [0.5, 1), accuracy-drop targets only) the target must hold with a margin of z
    standard errors of the paired drop (z the level's one-sided normal quantile): the cheapest point that meets
    the target on the calibration data meets it there by luck as often as not, and then falls short on new
    inputs (Fashion-MNIST: 0.4-0.45 points more drop on test than on val, every target).

    Class-exclusion bundles get the authors' per-exit beta search instead (tolerance =
    the target drop) unless `search_beta` is False (beta given by the user): then the
    static floors are searched like any threshold.
    """
    if len(x) != len(labels):
        raise ConfigError(f"calibration data has {len(x)} inputs but {len(labels)} labels")
    if not runner.manifest.exits:
        raise ConfigError("this bundle has no exit (a static network): there is nothing to calibrate")
    kind, value = check_objective(objective, max(1.0, runner.manifest.exit_costs()[-1]))
    z = check_confidence(confidence, objective)
    if kind == "latency":
        if latency is None:
            raise ConfigError("a latency budget needs a device profile (--profile NAME)")
        latency.check_budget(value)
    names = candidate_policies(runner, policy)
    candidates = [(name, mode) for name in names for mode in candidate_ensembles(runner, name, policy, ensemble)]
    betas = search_beta and names == [ExclusionPolicy.name] and all(isinstance(p, ExclusionPolicy) for p in runner.policies)
    if betas and robust is not None:
        raise ConfigError("--robust searches thresholds; class exclusion's beta search is not robust: fix beta with --beta")
    if betas and kind != "target_drop":
        raise ConfigError("class-exclusion bundles calibrate beta for an accuracy tolerance: use --target-drop "
                          "(or fix beta with --beta to search the thresholds for a budget)")
    started = time.perf_counter()
    progress(f"running {len(runner.sessions)} stages over {len(x)} calibration inputs")
    exit_outputs, final_logits = runner.stage_outputs(x)
    temperatures = [fit_temperature(o["logits"], labels) if "logits" in o else 1.0 for o in exit_outputs]
    progress(f"exit temperatures (NLL fit): {', '.join(f'{t:.3g}' for t in temperatures)}")
    costs = runner.manifest.exit_costs()
    shifted = [] if robust is None else corrupted_sets(runner, x, labels, robust, progress)
    if betas:
        best = ExclusionPolicy.name
        records = {best: search_betas(runner.policies, exit_outputs, final_logits, labels, costs, value, progress, confidence)}
        built = {best: with_betas(runner.policies, records[best]["chosen"]["betas"])}
    else:
        key = objective_key(objective, float((final_logits.argmax(axis=1) == labels).mean()), latency, z)
        records, built = {}, {}
        for name, mode in candidates:
            policies = [dataclasses.replace(p, temperature=t) if p.name == name else get_policy(name)(
                get_policy(name).default_threshold, {}, t) for p, t in zip(runner.policies, temperatures)]
            label = name if mode == NO_ENSEMBLE else f"{name}+{mode}"
            progress(f"policy {label}:")
            weights = None if mode == NO_ENSEMBLE else fit_ensemble_weights(policies, exit_outputs, final_logits, labels, mode, progress)
            built[label] = policies = with_ensemble(policies, mode, weights)
            records[label] = choose_thresholds(policies, exit_outputs, final_logits, labels, costs, objective, progress, latency,
                                               shifted, confidence)
            records[label]["ensemble"] = {"mode": mode, **({} if weights is None else {"weights": weights})}
        best = min(records, key=lambda name: key(selection_point(records[name])))
        if len(records) > 1:
            progress(f"chose policy {best}")
    record = records[best]
    record["search"]["seconds"] = round(time.perf_counter() - started, 3)
    if robust is not None:
        record["robust"] = {**robust.to_dict(), **record["robust"]}
    reference = drift_reference(built[best], exit_outputs, runner.manifest.num_classes, record["chosen"]["thresholds"])
    return {"data": {**(data or {}), "samples": int(len(x))}, "policy": record["policies"][0], "temperatures": temperatures,
            "candidates": {name: r["chosen"] for name, r in records.items()}, **record,
            "drift_reference": reference.to_dict()}


def point_of(chosen: dict) -> Point:
    """A Point back from its as_dict() form."""
    return Point(tuple(chosen["thresholds"]), chosen["accuracy"], chosen["relative_macs"], tuple(chosen["exit_counts"]),
                 chosen.get("drop_se", 0.0))


def selection_point(record: dict) -> Point:
    """The chosen point as the search ranked it: robust records rank by the clean reference minus the worst drop."""
    point = point_of(record["chosen"])
    if "robust" not in record:
        return point
    return dataclasses.replace(point, accuracy=record["robust"]["selection_accuracy"],
                               drop_se=record["robust"].get("selection_drop_se", 0.0))
