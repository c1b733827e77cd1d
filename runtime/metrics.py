"""Analysis metrics on stored exit outputs (numpy only): how well an exit's score ranks its own
correctness, and how many classes class exclusion leaves an input at each exit.

Both read the same per-exit output dicts the calibration simulator replays (role -> array), so
a figure here describes exactly the scores `run` and `calibrate` use.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from edgeexit.runtime.policies import POLICIES, Policy, get_policy


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve: the chance a random positive scores above a random negative (ties count half).

    Computed from average ranks (Mann-Whitney U). 1 = the score separates perfectly, 0.5 =
    no better than chance, below 0.5 = inverted. NaN when either group is empty.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positives = np.asarray(positives, dtype=bool).reshape(-1)
    if scores.shape != positives.shape:
        raise ValueError(f"scores and positives differ in length: {scores.size} vs {positives.size}")
    n_pos = int(positives.sum())
    n_neg = positives.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    # average rank (1-based) over each run of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], scores.size]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def exit_score(policy: Policy, outputs: dict[str, np.ndarray]) -> np.ndarray:
    """The policy's per-input score oriented so that higher means 'more ready to leave' (negated where the
    policy exits on low scores, as entropy does)."""
    scores = np.asarray(policy.scores(outputs), dtype=np.float64)
    return -scores if policy.exits_below else scores


def scored_policies() -> list[str]:
    """Names of the policies that decide by comparing one per-input score with a threshold."""
    return [name for name, cls in POLICIES.items() if cls.has_score()]


def ranking_auroc(exit_outputs: Sequence[dict[str, np.ndarray]], labels: np.ndarray,
                  policies: Sequence[str] | None = None) -> list[dict[str, float]]:
    """Per exit, AUROC of "this exit's prediction (argmax of its logits) is right" for each named score policy
    (default: every scored policy) the exit's outputs support, plus the exit's own accuracy."""
    labels = np.asarray(labels)
    policies = scored_policies() if policies is None else policies
    rows = []
    for outputs in exit_outputs:
        right = outputs["logits"].argmax(axis=1) == labels
        row = {"accuracy": float(right.mean())}
        for name in policies:
            policy = get_policy(name)(get_policy(name).default_threshold)
            if set(policy.roles) <= set(outputs):
                row[name] = auroc(exit_score(policy, outputs), right)
        rows.append(row)
    return rows


def classes_left(policies: Sequence[Policy], exit_outputs: Sequence[dict[str, np.ndarray]], num_classes: int) -> list[list[int]]:
    """Class exclusion's per-exit histogram: entry [k][j] counts the inputs that reach exit k and have j + 1
    classes left in play after its decision (j = 0: exactly one left, so they leave there).

    Replays the policies' own masks from exit to exit, so an input that left at exit k is
    counted at exit k and at no later one.
    """
    n = len(next(iter(exit_outputs[0].values())))
    state = policies[0].start(n, num_classes)
    alive = np.ones(n, dtype=bool)
    histograms = []
    for policy, outputs in zip(policies, exit_outputs):
        exits, _, state = policy.decide(outputs, state)
        left = state.sum(axis=1)[alive]
        histograms.append(np.bincount(left - 1, minlength=num_classes)[:num_classes].tolist())
        alive &= ~exits
    return histograms
