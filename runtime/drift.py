"""Drift guard: is the input stream still like the calibration data? Exit shares and exit scores, watched.

Calibration records a DriftReference in the manifest (its `drift_reference` entry): the share
of the calibration inputs leaving at each stage at the chosen thresholds, and per exit a few
quantiles of the policy's score over the inputs reaching it. A DriftGuard wraps a runner and
keeps the last `window` inputs' exits (and, on the stage chain, their exit scores); every
`window` inputs it compares the shares with the reference. A share is out of range when it
moves more than max(tolerance, 3 binomial standard deviations of the reference share).

Modes (GUARD_MODES): off; warn (one line per window out of range); fallback (also, while
out of range, each further window raises the thresholds one step toward the values that keep
every input, FALLBACK_STEPS steps, the last running full.onnx; back in range it returns to the
calibrated thresholds, and says so each time). During fallback the monitor still needs the
calibrated decisions: every `probe_every`-th call also runs the cascade at the calibrated
thresholds and only that feeds the window (extra work, counted in the report); the window is then
checked every window / probe_every probed inputs, so the guard moves at the same pace in the stream.
"""
from __future__ import annotations

import dataclasses
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from edgeexit.errors import BundleError, ConfigError
from edgeexit.runtime.cascade import CascadeResult, CascadeRunner, Runner
from edgeexit.runtime.policies import Policy

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
GUARD_MODES = ("off", "warn", "fallback")
DEFAULT_WINDOW = 256
DEFAULT_TOLERANCE = 0.1  # absolute change of a stage's exit share
FALLBACK_STEPS = 3  # steps from the calibrated thresholds to full.onnx
PROBE_EVERY = 4
MAX_EVENTS = 100  # event lines kept in the report


@dataclass(frozen=True)
class DriftReference:
    """What calibration saw at its chosen thresholds: the share of inputs leaving at each stage (last: the final
    stage), and per exit the QUANTILES of its policy score over the inputs reaching it (None: no single score)."""

    thresholds: tuple[float, ...]
    exit_shares: tuple[float, ...]
    score_quantiles: tuple[tuple[float, ...] | None, ...]
    samples: int
    quantiles: tuple[float, ...] = QUANTILES

    def to_dict(self) -> dict:
        return {"thresholds": list(self.thresholds), "exit_shares": list(self.exit_shares),
                "score_quantiles": [None if q is None else list(q) for q in self.score_quantiles],
                "quantiles": list(self.quantiles), "samples": self.samples}

    @classmethod
    def from_dict(cls, data: object, num_exits: int) -> DriftReference:
        """Read the manifest entry; BundleError naming what is wrong."""
        try:
            reference = cls(tuple(float(t) for t in data["thresholds"]), tuple(float(s) for s in data["exit_shares"]),
                            tuple(None if q is None else tuple(float(v) for v in q) for q in data["score_quantiles"]),
                            int(data["samples"]), tuple(float(q) for q in data["quantiles"]))
        except (TypeError, KeyError, ValueError) as exc:
            raise BundleError(f"manifest calibration.drift_reference is malformed: {exc!r}") from None
        if len(reference.exit_shares) != num_exits + 1 or len(reference.score_quantiles) != num_exits \
                or len(reference.thresholds) != num_exits:
            raise BundleError(f"manifest calibration.drift_reference must describe {num_exits} exits and the final stage")
        return reference


def policy_scores(policy: Policy, outputs: dict[str, np.ndarray]) -> np.ndarray | None:
    """The policy's per-input score, or None for a policy without one (class exclusion)."""
    try:
        return np.asarray(policy.scores(outputs), dtype=np.float64)
    except NotImplementedError:
        return None


def drift_reference(policies: Sequence[Policy], exit_outputs: Sequence[dict[str, np.ndarray]], num_classes: int,
                    thresholds: Sequence[float]) -> DriftReference:
    """The reference of stored outputs (CascadeRunner.stage_outputs) at `thresholds`, decided as the simulator does."""
    n = len(next(iter(exit_outputs[0].values())))
    alive = np.ones(n, dtype=bool)
    state = policies[0].start(n, num_classes)
    shares, quantiles = [], []
    for policy, outputs, threshold in zip(policies, exit_outputs, thresholds):
        policy = dataclasses.replace(policy, threshold=float(threshold))
        scores = policy_scores(policy, outputs)
        quantiles.append(None if scores is None or not alive.any() else tuple(np.quantile(scores[alive], QUANTILES).tolist()))
        exits, _, state = policy.decide(outputs, state)
        shares.append(float((exits & alive).mean()))
        alive &= ~exits
    shares.append(float(alive.mean()))
    return DriftReference(tuple(float(t) for t in thresholds), tuple(shares), tuple(quantiles), n)


def manifest_reference(runner: Runner) -> tuple[DriftReference | None, str]:
    """The bundle's reference and "" if it applies to the runner's thresholds, else None and why not (one line)."""
    calibration = runner.manifest.calibration
    data = calibration.get("drift_reference") if isinstance(calibration, dict) else getattr(calibration, "drift_reference", None)
    if data is None:
        return None, "no drift reference: the bundle was calibrated by an older edgeexit (or not at all); run `edgeexit calibrate`"
    reference = data if isinstance(data, DriftReference) else DriftReference.from_dict(data, runner.num_exits)
    if not np.allclose(reference.thresholds, runner.thresholds, rtol=0, atol=1e-9):
        return None, (f"no drift reference for these thresholds: calibration recorded {list(reference.thresholds)}, "
                      f"the runner has {runner.thresholds}")
    return reference, ""


def share_bands(reference: DriftReference, window: int, tolerance: float) -> np.ndarray:
    """Allowed absolute change per stage share: max(tolerance, 3 binomial standard deviations over `window` inputs)."""
    p = np.asarray(reference.exit_shares)
    return np.maximum(tolerance, 3.0 * np.sqrt(p * (1 - p) / window))


def compare_shares(reference: DriftReference | None, exit_index: np.ndarray, window: int, tolerance: float) -> dict:
    """Observed stage shares of `exit_index` against the reference: the entry run and bench reports carry."""
    observed = np.bincount(exit_index, minlength=len(reference.exit_shares) if reference else 1) / max(len(exit_index), 1)
    if reference is None:
        return {"observed_shares": observed.tolist()}
    bands = share_bands(reference, window, tolerance)
    delta = observed - np.asarray(reference.exit_shares)
    return {"observed_shares": observed.tolist(), "reference_shares": list(reference.exit_shares),
            "allowed_change": bands.tolist(), "out_of_range": [int(i) for i in np.flatnonzero(np.abs(delta) > bands)]}


def drift_entry(runner: Runner, exit_index: np.ndarray, tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """A whole run's exit shares against the bundle's reference (one window the size of the run)."""
    reference, why = manifest_reference(runner)
    return {**compare_shares(reference, exit_index, len(exit_index), tolerance), "reference": why or "calibration"}


@dataclass
class GuardSettings:
    """How a DriftGuard watches: mode, window size, tolerance, how often fallback probes the calibrated cascade."""

    mode: str = "warn"
    window: int = DEFAULT_WINDOW
    tolerance: float = DEFAULT_TOLERANCE
    probe_every: int = PROBE_EVERY

    def __post_init__(self) -> None:
        if self.mode not in GUARD_MODES:
            raise ConfigError(f"unknown guard mode '{self.mode}'; choose from: {', '.join(GUARD_MODES)}")
        if self.window < 1 or self.probe_every < 1:
            raise ConfigError(f"guard window and probe interval must be >= 1, got {self.window} and {self.probe_every}")
        if not 0 < self.tolerance < 1:
            raise ConfigError(f"guard tolerance must be a share in (0, 1), got {self.tolerance}")


def stderr_line(message: str) -> None:
    """The guard's lines go to stderr, beside the report on stdout."""
    print(message, file=sys.stderr, flush=True)


@dataclass
class _Window:
    """The last `size` inputs' exit indices and, per exit, scores of the inputs that reached it."""

    size: int
    exits: deque = field(default_factory=deque)
    scores: dict = field(default_factory=dict)
    fresh: int = 0  # inputs added since the last check

    def add(self, exit_index: np.ndarray) -> None:
        self.exits.extend(exit_index.tolist())
        while len(self.exits) > self.size:
            self.exits.popleft()
        self.fresh += len(exit_index)

    def add_scores(self, index: int, scores: np.ndarray) -> None:
        kept = self.scores.setdefault(index, deque(maxlen=self.size))
        kept.extend(scores.tolist())


class DriftGuard:
    """A runner behind the drift guard: `predict` as the runner's, plus warnings or fallback (see the module docstring).

    >>> guard = DriftGuard(CascadeRunner("bundle/"), GuardSettings("fallback"))
    >>> result = guard.predict(batch)
    >>> guard.report()["windows_out_of_range"]
    """

    def __init__(self, runner: Runner, settings: GuardSettings = GuardSettings(),
                 say: Callable[[str], None] = stderr_line) -> None:
        self.runner = runner
        self.settings = settings
        self.say = say
        self.reference, why = manifest_reference(runner) if settings.mode != "off" else (None, "guard off")
        self.calibrated = list(runner.thresholds)
        self.level = 0  # 0: calibrated thresholds; FALLBACK_STEPS: full.onnx
        self.window = _Window(settings.window)
        self.calls = 0
        self.checked = 0
        self.out_of_range = 0
        self.fallback_inputs = 0
        self.probe_inputs = 0
        self.events: list[str] = []
        self.last: dict | None = None
        self.why = why
        self._monitoring = True  # whether the runner's current call feeds the window (False for fallback calls)
        if settings.mode != "off" and self.reference is None:
            self._event(f"drift guard: {why}")
        if self.reference is not None and isinstance(runner, CascadeRunner):
            runner.observer = self._observe_scores

    def _event(self, line: str) -> None:
        self.say(line)
        if len(self.events) < MAX_EVENTS:
            self.events.append(line)

    def _observe_scores(self, index: int, policy: Policy, outputs: dict[str, np.ndarray]) -> None:
        if self._monitoring:
            scores = policy_scores(policy, outputs)
            if scores is not None:
                self.window.add_scores(index, scores)

    def fallback_thresholds(self, level: int) -> list[float] | None:
        """Thresholds `level` steps of FALLBACK_STEPS toward keeping every input; None: run full.onnx instead."""
        if level >= FALLBACK_STEPS or any(p.forcing is None for p in self.runner.policies):
            return None
        fraction = level / FALLBACK_STEPS
        return [t + (p.forcing[1] - t) * fraction for p, t in zip(self.runner.policies, self.calibrated)]

    def predict(self, x: np.ndarray) -> CascadeResult:
        """The runner's prediction (fallback: at raised thresholds, or full.onnx's), the stream watched."""
        self.calls += 1
        if self.reference is None:
            return self.runner.predict(x)
        watched = None
        if self.level == 0 or self.calls % self.settings.probe_every == 0:
            watched = self.runner.predict(x, thresholds=self.calibrated)
            self._watch(watched)  # may move the level
        if self.level == 0:
            return watched  # a probe that brings the stream back in range answers its own call
        self.probe_inputs += 0 if watched is None else len(x)
        self.fallback_inputs += len(x)
        self._monitoring = False
        try:
            thresholds = self.fallback_thresholds(self.level)
            if thresholds is not None:
                return self.runner.predict(x, thresholds=thresholds)
            logits = self.runner.predict_full(x)
            return CascadeResult(logits.argmax(axis=1), np.full(len(x), self.runner.num_exits, np.int64), self.runner.num_stages)
        finally:
            self._monitoring = True

    def _watch(self, result: CascadeResult) -> None:
        self.window.add(result.exit_index)
        # During fallback only every probe_every-th call feeds the window; it is checked every window / probe_every
        # fresh inputs so that the guard still moves once per `window` inputs of the stream (checking only when the
        # window had been refilled took the digits demo 570 translated inputs to reach full.onnx instead of 190).
        every = self.settings.window if self.level == 0 else max(1, self.settings.window // self.settings.probe_every)
        if self.window.fresh >= every and len(self.window.exits) >= self.settings.window:
            self.window.fresh = 0
            self._check()

    def _check(self) -> None:
        """Compare the window with the reference; warn, and in fallback mode move the level."""
        self.checked += 1
        entry = compare_shares(self.reference, np.asarray(self.window.exits), self.settings.window, self.settings.tolerance)
        entry["score_quantiles"] = {str(k): np.quantile(np.asarray(v), self.reference.quantiles).tolist()
                                    for k, v in sorted(self.window.scores.items()) if v}
        entry["reference_score_quantiles"] = {str(k): list(q) for k, q in enumerate(self.reference.score_quantiles) if q}
        self.last = entry
        shares = ", ".join(f"{o:.2f}" for o in entry["observed_shares"])
        expected = ", ".join(f"{r:.2f}" for r in entry["reference_shares"])
        if entry["out_of_range"]:
            self.out_of_range += 1
            stages = ", ".join(map(str, entry["out_of_range"]))
            action = ""
            if self.settings.mode == "fallback":
                self.level = min(self.level + 1, FALLBACK_STEPS)
                raised = self.fallback_thresholds(self.level)
                action = ("; fallback: full.onnx decides every input" if raised is None else
                          f"; fallback step {self.level}/{FALLBACK_STEPS}: thresholds {', '.join(f'{t:.4g}' for t in raised)}")
            self._event(f"drift guard: window {self.checked}: exit shares {shares} vs calibrated {expected} "
                        f"(stage {stages} out of range){action}")
        elif self.level:
            self.level = 0
            self._event(f"drift guard: window {self.checked}: exit shares {shares} back in range; calibrated thresholds "
                        f"{', '.join(f'{t:.4g}' for t in self.calibrated)} restored")

    def report(self) -> dict:
        """The guard's entry of a run report."""
        return {"mode": self.settings.mode, "window": self.settings.window, "tolerance": self.settings.tolerance,
                "reference": self.why or "calibration", "windows_checked": self.checked,
                "windows_out_of_range": self.out_of_range, "fallback_level": self.level, "fallback_inputs": self.fallback_inputs,
                "probe_inputs": self.probe_inputs, "last_window": self.last, "events": self.events}

    def close(self) -> None:
        """Detach from the runner (its observer hook)."""
        if getattr(self.runner, "observer", None) == self._observe_scores:
            self.runner.observer = None
