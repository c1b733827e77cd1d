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


def test_every_policy_registers_its_numpy_rule_and_its_onnx_builder_together():
    from dataclasses import dataclass

    from edgeexit.runtime.policies import ENSEMBLES, POLICIES, RULES, MaxSoftmaxPolicy, Policy, _owner, register_policy

    for name, cls in POLICIES.items():
        for numpy_half, graph_half in RULES:
            assert _owner(cls, numpy_half) is _owner(cls, graph_half), f"{name}: {numpy_half} / {graph_half}"
    for rule in ENSEMBLES.items():
        assert _owner(type(rule[1]), "term") is _owner(type(rule[1]), "graph_term")

    @dataclass
    class NumpyOnly(MaxSoftmaxPolicy):
        name = "numpy_only"

        def score_probs(self, probs):
            return probs.min(axis=1)

    with pytest.raises(ValueError, match="NumpyOnly defines score_probs without graph_score_probs"):
        register_policy(NumpyOnly)

    @dataclass
    class GraphOnly(Policy):
        name = "graph_only"

        def emit(self, g, out, index, state):
            return out["logits"], out["logits"], out["logits"], state

    with pytest.raises(ValueError, match="GraphOnly defines emit without decide/assess"):
        register_policy(GraphOnly)

    @dataclass
    class AssessOnly(MaxSoftmaxPolicy):  # a new decision through assess needs its ONNX half as well
        name = "assess_only"

        def assess(self, outputs, state):
            return outputs["logits"].min(axis=1), outputs["logits"].argmin(axis=1), state

    with pytest.raises(ValueError, match="AssessOnly defines decide/assess without emit"):
        register_policy(AssessOnly)

    @dataclass
    class NoDecision(Policy):
        name = "no_decision"

    with pytest.raises(ValueError, match="no decision"):
        register_policy(NoDecision)
    assert not {"numpy_only", "graph_only", "assess_only", "no_decision"} & set(POLICIES)


def test_only_a_threshold_that_just_compares_lets_the_simulator_assess_each_exit_once():
    from dataclasses import dataclass

    from edgeexit.runtime.policies import POLICIES, ConfidencePolicy

    assert sorted(n for n, cls in POLICIES.items() if cls.thresholds_only_compare()) == ["confidence", "entropy", "max_softmax"]

    @dataclass
    class ThresholdShapesState(ConfidencePolicy):  # decide overridden: the state may depend on the threshold
        def decide(self, outputs, state):
            return super().decide(outputs, state)

    assert not ThresholdShapesState.thresholds_only_compare()


def test_policy_lists_are_derived_from_the_entries():
    from edgeexit.runtime.policies import POLICIES, ensemble_policies, policies_for

    everything = ("logits", "confidence_logit", "exclusion_logits")
    # a score policy compares one per-input score with its threshold: what calibrate --policy auto searches
    assert policies_for(everything, scored=True) == [n for n, cls in POLICIES.items() if cls.has_score()]
    assert "exclusion" not in policies_for(everything, scored=True) and "exclusion" in policies_for(everything)
    assert policies_for(("logits",), scored=True) == ["max_softmax", "entropy"]
    assert ensemble_policies() == [n for n, cls in POLICIES.items() if "temperature" in cls.vectors]
