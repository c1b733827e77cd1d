"""The cascade replayed in numpy from stored per-exit outputs: what trainer, calibrate and bench simulate.

The decisions are the runtime's own Policy objects, so a simulated operating point is what
`CascadeRunner.predict` does at those thresholds. Ensembles at deferral are fitted here too
(fit_ensemble_weights), on the same stored outputs.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from edgeexit.runtime.policies import Policy, with_ensemble

# an exit's ensemble weight relative to the final stage's 1, searched in log space: beyond it the exit (or the
# final stage) is all but left out of every later mean
WEIGHT_RANGE = (1e-3, 1e3)
WEIGHT_ROUNDS = 3


@dataclass(frozen=True)
class Point:
    """One simulated operating point of the cascade."""

    thresholds: tuple[float, ...]
    accuracy: float
    relative_macs: float
    exit_counts: tuple[int, ...]
    drop_se: float = 0.0  # standard error of the drop against full.onnx, paired on the same inputs

    def accuracy_bound(self, z: float) -> float:
        """Accuracy less z standard errors of the drop: what an accuracy-drop target at a confidence level compares."""
        return self.accuracy - z * self.drop_se

    def as_dict(self) -> dict:
        return {"thresholds": list(self.thresholds), "accuracy": self.accuracy,
                "relative_macs": self.relative_macs, "exit_counts": list(self.exit_counts), "drop_se": self.drop_se}


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
        # Where every exit's threshold enters only through `compare`, each exit is assessed once and each
        # (exit, threshold) compared once: `calibrate --policy auto` on 9,000 Fashion-MNIST val inputs and two exits
        # evaluates ~11,800 operating points, 22 of its 26 s when every point re-took the softmax of every exit.
        self.assessed = all(type(p).thresholds_only_compare() for p in self.policies)
        self._cache: dict[tuple, tuple[np.ndarray, np.ndarray, object]] = {}
        self._final: np.ndarray | None = None
        self._reference_correct = (final_logits.argmax(axis=1) == labels).astype(np.float64)
        self.evaluated: dict[tuple[float, ...], Point] = {}

    def _assess(self, k: int) -> tuple[np.ndarray, np.ndarray, object]:
        """(scores, predictions, state) at exit k, the same at every threshold."""
        if ("assess", k) not in self._cache:
            state = self.policies[0].start(len(self.labels), self.num_classes) if k == 0 else self._assess(k - 1)[2]
            self._cache["assess", k] = self.policies[k].assess(self.exit_outputs[k], state)
        return self._cache["assess", k]

    def _decide(self, thresholds: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, object]:
        """(exits, predictions, state) at exit len(thresholds)-1 for every input, cached by prefix (or by exit and
        threshold, when the threshold only compares)."""
        k = len(thresholds) - 1
        key = ("compare", k, thresholds[k]) if self.assessed else thresholds
        if key not in self._cache:
            policy = dataclasses.replace(self.policies[k], threshold=thresholds[k])
            if self.assessed:
                scores, predictions, state = self._assess(k)
                self._cache[key] = policy.compare(scores), predictions, state
            else:
                state = self.policies[0].start(len(self.labels), self.num_classes) if k == 0 else self._decide(thresholds[:-1])[2]
                self._cache[key] = policy.decide(self.exit_outputs[k], state)
        return self._cache[key]

    def _final_predictions(self, thresholds: tuple[float, ...], state: object) -> np.ndarray:
        """The final stage's predictions for every input (once, when no threshold shapes the state)."""
        if not self.assessed:
            return dataclasses.replace(self.policies[-1], threshold=thresholds[-1]).final(self.final_logits, state)
        if self._final is None:
            self._final = self.policies[-1].final(self.final_logits, state)
        return self._final

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
            predictions[alive] = self._final_predictions(key, state)[alive]
        correct = predictions == self.labels
        point = Point(key, float(correct.mean()), float(self.costs[exit_index].mean()),
                      tuple(np.bincount(exit_index, minlength=last + 1).tolist()), paired_se(self._reference_correct, correct))
        self.evaluated[key] = point
        return point

    def pareto(self) -> list[Point]:
        """Evaluated points no other point beats on both accuracy and MACs, by rising MACs."""
        return pareto_front(self.evaluated.values())


def paired_se(reference_correct: np.ndarray, correct: np.ndarray) -> float:
    """Standard error of mean(reference_correct - correct): the drop's, paired on the same inputs (only the inputs
    on which the two disagree add to it)."""
    d = reference_correct - correct
    n = len(d)
    return float(math.sqrt(max(float((d * d).mean()) - float(d.mean()) ** 2, 0.0) / max(n - 1, 1))) if n else 0.0


def pareto_front(points: Iterable[Point]) -> list[Point]:
    """The points no other point beats on both accuracy and MACs, by rising MACs."""
    front, best = [], -1.0
    for point in sorted(points, key=lambda p: (p.relative_macs, -p.accuracy)):
        if point.accuracy > best:
            front.append(point)
            best = point.accuracy
    return front


def grid_points(grids: Sequence[np.ndarray], count: int | None = None) -> list[list[float]]:
    """`count` shared operating points (default: the longest grid's length), point i taking from every
    exit's grid the value at the same fraction i / (count - 1) of the way along it."""
    count = count or max(len(g) for g in grids)
    return [[float(g[round(i * (len(g) - 1) / max(count - 1, 1))]) for g in grids] for i in range(count)]


def golden_minimum(f: Callable[[float], float], low: float, high: float, steps: int = 40) -> float:
    """The argument in [low, high] minimizing a unimodal f, by golden-section search (the midpoint of the last bracket)."""
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = f(a), f(b)
    for _ in range(steps):
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = f(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = f(b)
    return (low + high) / 2


def ensemble_nll(policies: Sequence[Policy], exit_outputs: Sequence[dict[str, np.ndarray]], final_logits: np.ndarray,
                 labels: np.ndarray) -> float:
    """Negative log-likelihood of the labels summed over the stages, each stage's probabilities its ensemble of the
    stages so far (policies with an ensemble, see policies.with_ensemble), averaged over the inputs."""
    rows = np.arange(len(labels))
    state, total = None, 0.0
    stages = []
    for policy, outputs in zip(policies, exit_outputs):
        state, probs = policy.ensembled(outputs["logits"], state)
        stages.append(probs)
    stages.append(policies[-1].final_probabilities(final_logits, state))
    for probs in stages:
        total += float(-np.log(np.clip(probs[rows, labels], 1e-300, None)).mean())
    return total


def fit_ensemble_weights(policies: Sequence[Policy], exit_outputs: Sequence[dict[str, np.ndarray]], final_logits: np.ndarray,
                         labels: np.ndarray, mode: str, progress: Callable[[str], None] = lambda message: None) -> list[float]:
    """Per-exit weights w_k > 0 of ensemble `mode` (the final stage's fixed at 1: every mean is scale-free, so that
    loses nothing), minimizing ensemble_nll on the data (Zero Time Waste fits its ensemble weights by NLL too).

    Coordinate descent: each weight in turn by golden-section search on log w within WEIGHT_RANGE, the others
    fixed, WEIGHT_ROUNDS rounds. The policies' temperatures apply (fit them first)."""
    weights = [1.0] * len(policies)
    low, high = (math.log(w) for w in WEIGHT_RANGE)

    def loss(k: int, log_w: float) -> float:
        trial = [*weights[:k], math.exp(log_w), *weights[k + 1 :]]
        return ensemble_nll(with_ensemble(policies, mode, trial), exit_outputs, final_logits, labels)

    for round_index in range(WEIGHT_ROUNDS):
        for k in range(len(weights)):
            weights[k] = math.exp(golden_minimum(lambda log_w: loss(k, log_w), low, high))
        progress(f"{mode} ensemble weights, round {round_index + 1}: {', '.join(f'{w:.3g}' for w in weights)} "
                 f"(final stage 1), NLL summed over stages {loss(0, math.log(weights[0])):.4f}")
    return weights
