"""Exit policies on hand-made outputs: the confidence policy decides in float64 logit space."""
import numpy as np
import pytest

from edgeexit.runtime.calibrate import score_grid
from edgeexit.runtime.policies import ConfidencePolicy, logit


def confidence_outputs(z) -> dict[str, np.ndarray]:
    z = np.asarray(z, dtype=np.float32).reshape(-1, 1)
    return {"logits": np.zeros((len(z), 3), dtype=np.float32), "confidence_logit": z}


@pytest.mark.parametrize("threshold", [0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99])
def test_logit_space_decisions_equal_sigmoid_space_where_it_does_not_saturate(threshold):
    z = np.random.default_rng(0).normal(0, 4, 5000).astype(np.float32)  # |z| < ~17: float32 sigmoid below 1
    sigmoid = 1 / (1 + np.exp(-z.astype(np.float64)))
    clear = np.abs(sigmoid - threshold) > 1e-9  # leave out float ties exactly at T
    exits, _, _ = ConfidencePolicy(threshold).decide(confidence_outputs(z), None)
    np.testing.assert_array_equal(exits[clear], (sigmoid >= threshold)[clear])
    assert 0 < exits.sum() < len(z)


def test_logits_200_and_150_still_rank_where_a_float32_sigmoid_ties_them():
    z = np.array([150.0, 200.0], dtype=np.float32)
    assert (1 / (1 + np.exp(-z))).tolist() == [1.0, 1.0]  # what the old sigmoid output gave
    scores = ConfidencePolicy(0.5).scores(confidence_outputs(z))
    assert scores[1] > scores[0]
    # near 1, thresholds still separate logits a float32 sigmoid ties: 20 and 30 (cutoff ~27.6)
    exits, _, _ = ConfidencePolicy(1 - 1e-12).decide(confidence_outputs([20.0, 30.0]), None)
    assert exits.tolist() == [False, True]


def test_threshold_ends_always_and_never():
    z = confidence_outputs([-1e30, -50.0, 0.0, 50.0, 3e38])
    assert ConfidencePolicy(0.0).decide(z, None)[0].all()
    assert not ConfidencePolicy(1.0).decide(z, None)[0].any()
    exits, _, _ = ConfidencePolicy(0.5).decide(z, None)
    assert exits.tolist() == [False, False, True, True, True]  # >=: sigmoid(0) = 0.5 exits at T = 0.5
    assert logit(0.5) == 0.0 and logit(0.0) == -np.inf and logit(1.0) == np.inf


def test_calibration_grid_maps_logit_quantiles_back_to_thresholds():
    z = np.linspace(-6, 6, 101)
    grid = score_grid(ConfidencePolicy(0.5), [confidence_outputs(z)], size=11)
    assert grid.min() >= 0.0 and grid.max() <= 1.0
    # the candidates are the logit quantiles mapped through the sigmoid: as T they spread the exit share evenly
    shares = {int(ConfidencePolicy(float(t)).decide(confidence_outputs(z), None)[0].sum()) for t in grid}
    assert len(shares) >= 9 and {0, 101} <= shares
