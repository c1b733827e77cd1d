"""Analysis metrics on hand-made scores: AUROC (ranking of 'this exit is right') and class exclusion's classes-left histogram."""
import math

import numpy as np
import pytest

from edgeexit.runtime.metrics import auroc, classes_left, ranking_auroc
from edgeexit.runtime.policies import ExclusionPolicy


def brute_auroc(scores, positives):
    """Every (positive, negative) pair: 1 if the positive scores higher, 1/2 on a tie."""
    pos = [s for s, p in zip(scores, positives) if p]
    neg = [s for s, p in zip(scores, positives) if not p]
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg) / (len(pos) * len(neg))


def test_auroc_on_hand_made_scores():
    assert auroc([0.9, 0.8, 0.3, 0.1], [1, 1, 0, 0]) == 1.0  # separates perfectly
    assert auroc([0.1, 0.3, 0.8, 0.9], [1, 1, 0, 0]) == 0.0  # inverted
    # pairs (pos, neg): (0.9, 0.5) (0.9, 0.2) win, (0.4, 0.5) loses, (0.4, 0.2) wins -> 3/4
    assert auroc([0.9, 0.4, 0.5, 0.2], [1, 1, 0, 0]) == pytest.approx(0.75)
    # a tie between a positive and a negative counts half: (0.5, 0.5) half, (0.5, 0.1) win, (0.7, *) win -> 3.5/4
    assert auroc([0.5, 0.7, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.875)
    assert auroc([0.3, 0.3, 0.3], [1, 0, 1]) == pytest.approx(0.5)  # constant score: chance
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))  # no negatives: undefined


def test_auroc_matches_pairwise_count_with_many_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=60).astype(float)  # few distinct values: many ties
    positives = rng.random(60) < 0.4
    assert auroc(scores, positives) == pytest.approx(brute_auroc(scores, positives))
    with pytest.raises(ValueError, match="differ in length"):
        auroc(scores, positives[:-1])


def test_ranking_auroc_orients_entropy_and_skips_missing_roles():
    """Exit 0 is right on inputs 0 and 1; their logits are the peaked ones, so every softmax score ranks them first."""
    logits = np.array([[6.0, 0.0, 0.0], [0.0, 5.0, 0.0], [1.0, 0.9, 0.0], [0.2, 0.0, 0.3]])
    labels = np.array([0, 1, 1, 1])
    confidence = np.array([[-3.0], [-2.0], [1.0], [2.0]])  # inverted on purpose
    rows = ranking_auroc([{"logits": logits, "confidence_logit": confidence}, {"logits": logits}], labels)
    assert rows[0]["accuracy"] == 0.5
    assert rows[0]["max_softmax"] == 1.0 and rows[0]["entropy"] == 1.0  # low entropy ranks as 'ready to leave'
    assert rows[0]["confidence"] == 0.0
    assert "confidence" not in rows[1]


def as_logits(scores):
    scores = np.asarray(scores, dtype=np.float64)
    return {"exclusion_logits": np.log(scores / (1 - scores))}


def test_classes_left_follows_the_masks_from_exit_to_exit():
    """Three inputs, four classes, beta 0.5 at both exits."""
    policies = [ExclusionPolicy(0.0, {"beta": 0.5}), ExclusionPolicy(0.0, {"beta": 0.5})]
    exit0 = as_logits([[0.9, 0.2, 0.5, 0.1],    # keeps 0, 2 -> 2 left
                       [0.1, 0.8, 0.3, 0.39],   # keeps 1 -> 1 left, leaves at exit 0
                       [0.6, 0.6, 0.6, 0.6]])   # keeps all 4 (none <= 0.3)
    exit1 = as_logits([[0.2, 0.99, 0.9, 0.1],   # class 1 was excluded: only 0 and 2 count; max 0.9, keeps 2 -> 1 left
                       [0.5, 0.5, 0.5, 0.5],    # already gone: not counted
                       [0.9, 0.8, 0.3, 0.2]])   # keeps 0, 1 -> 2 left
    histograms = classes_left(policies, [exit0, exit1], 4)
    assert histograms == [[1, 1, 0, 1], [1, 1, 0, 0]]
