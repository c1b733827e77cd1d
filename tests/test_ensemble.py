"""Ensembles at deferral: stage k decides and predicts from a weighted mean of the class probabilities of exits 0..k."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnxruntime as ort
import pytest

import handmade

from edgeexit.errors import BundleError, ConfigError
from edgeexit.export.cascade_graph import build_cascade, write_cascade
from edgeexit.runtime.bundle import save_manifest
from edgeexit.runtime.cascade import CascadeRunner
from edgeexit.runtime.graph import GraphRunner, open_runner
from edgeexit.runtime.manifest import MANIFEST_NAME, load_manifest, read_manifest
from edgeexit.runtime.policies import EntropyPolicy, MaxSoftmaxPolicy, with_ensemble
from edgeexit.runtime.simulate import CascadeSimulator, ensemble_nll, fit_ensemble_weights

# exit 0, exit 1 and the final stage's class probabilities for two inputs; logits are their logs
P0 = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
P1 = np.array([[0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
PF = np.array([[0.1, 0.2, 0.7], [0.3, 0.3, 0.4]])
WEIGHTS = (1.0, 3.0)  # exit 0, exit 1; the final stage's is 1


def outputs(p: np.ndarray) -> dict[str, np.ndarray]:
    return {"logits": np.log(p).astype(np.float32)}


def run(policies, thresholds):
    """(exit index, prediction) per input through the policies' numpy rules, as the stage chain applies them."""
    policies = [dataclasses.replace(p, threshold=t) for p, t in zip(policies, thresholds)]
    sim = CascadeSimulator(policies, [outputs(P0), outputs(P1)], np.log(PF).astype(np.float32), np.zeros(2, int), [0.3, 0.6, 1.0])
    state, exits, preds = None, [2, 2], [None, None]
    for k, (policy, out) in enumerate(zip(policies, [outputs(P0), outputs(P1)])):
        leave, guess, state = policy.decide(out, state)
        for i in range(2):
            if leave[i] and exits[i] == 2:
                exits[i], preds[i] = k, int(guess[i])
    final = policies[-1].final(np.log(PF).astype(np.float32), state)
    preds = [int(final[i]) if preds[i] is None else preds[i] for i in range(2)]
    point = sim.evaluate(thresholds)
    assert point.exit_counts == tuple(np.bincount(exits, minlength=3))  # the simulator replays the same rule
    return exits, preds


def test_mean_ensemble_decides_and_predicts_from_the_weighted_mean_computed_by_hand():
    policies = with_ensemble([MaxSoftmaxPolicy(0.5), MaxSoftmaxPolicy(0.5)], "mean", WEIGHTS)
    # exit 1 of input 0: (1 * [.6 .3 .1] + 3 * [.2 .7 .1]) / 4 = [.3 .6 .1]; alone exit 1 says .7
    total, probs = policies[1].ensembled(outputs(P1)["logits"], policies[0].ensembled(outputs(P0)["logits"], None)[0])
    np.testing.assert_allclose(probs[0], [0.3, 0.6, 0.1], atol=1e-6)
    np.testing.assert_allclose(probs[1], [(0.2 + 0.3) / 4, (0.5 + 0.3) / 4, (0.3 + 2.4) / 4], atol=1e-6)
    # final stage of input 0: (p0 + 3 p1 + pf) / 5 = [.26 .52 .22]: class 1, where the final stage alone says 2
    np.testing.assert_allclose(policies[1].final_probabilities(np.log(PF), total)[0], [0.26, 0.52, 0.22], atol=1e-6)
    # T = 0.65: input 0 stays at both exits (.6, .6) and the final ensemble predicts class 1; input 1 leaves at
    # exit 1 (ensemble .675 on class 2). Without the ensemble input 0 leaves at exit 1 (.7) and input 1 too (.8).
    assert run(policies, [0.65, 0.65]) == ([2, 1], [1, 2])
    plain = [MaxSoftmaxPolicy(0.5), MaxSoftmaxPolicy(0.5)]
    assert run(plain, [0.65, 0.65]) == ([1, 1], [1, 2])
    # T = 0.55: input 0 leaves at exit 0 (.6) with class 0; input 1 at exit 1 (.675)
    assert run(policies, [0.55, 0.55]) == ([0, 1], [0, 2])


def test_geometric_ensemble_is_the_renormalized_weighted_product():
    policies = with_ensemble([EntropyPolicy(1.0), EntropyPolicy(1.0)], "geometric", WEIGHTS)
    _, probs = policies[1].ensembled(outputs(P1)["logits"], policies[0].ensembled(outputs(P0)["logits"], None)[0])
    product = P0 ** (1 / 4) * P1 ** (3 / 4)
    np.testing.assert_allclose(probs, product / product.sum(axis=1, keepdims=True), rtol=1e-6)
    entropy = -(probs * np.log(probs)).sum(axis=1)
    exits, _ = run(policies, [0.0, float(entropy[0]) + 1e-6])  # entropy <= T: input 0 leaves at exit 1
    assert exits[0] == 1 and exits[1] == (1 if entropy[1] <= entropy[0] + 1e-6 else 2)
    total = policies[0].ensembled(outputs(P0)["logits"], None)[0]
    total = policies[1].ensembled(outputs(P1)["logits"], total)[0]
    final = P0 ** (1 / 5) * P1 ** (3 / 5) * PF ** (1 / 5)
    np.testing.assert_allclose(policies[1].final_probabilities(np.log(PF), total), final / final.sum(axis=1, keepdims=True),
                               rtol=1e-6)


def test_an_ensemble_needs_a_probability_policy_and_positive_weights():
    from edgeexit.runtime.policies import ConfidencePolicy, ExclusionPolicy

    for cls in (ConfidencePolicy, ExclusionPolicy):
        with pytest.raises(ConfigError, match="needs a policy that reads class probabilities \\(max_softmax, entropy\\)"):
            cls(0.5, ensemble="mean", weights=(1.0,))
    with pytest.raises(ConfigError, match="ensemble weight must be a finite number > 0"):
        MaxSoftmaxPolicy(0.5, ensemble="mean", weights=(0.0,))
    with pytest.raises(ConfigError, match="unknown ensemble 'median'; choose from: none, mean, geometric"):
        MaxSoftmaxPolicy(0.5, ensemble="median", weights=(1.0,))


def test_fitted_weights_lower_the_nll_and_favour_the_informative_exit():
    rng = np.random.default_rng(0)
    n, classes = 600, 5
    labels = rng.integers(0, classes, n)
    onehot = np.eye(classes)[labels]
    noise = rng.normal(0, 1.0, (n, classes)).astype(np.float32)  # exit 0: says nothing about the label
    informed = (3.0 * onehot + rng.normal(0, 1.5, (n, classes))).astype(np.float32)
    final = (3.0 * onehot + rng.normal(0, 1.5, (n, classes))).astype(np.float32)
    exits = [{"logits": noise}, {"logits": informed}]
    plain = [MaxSoftmaxPolicy(0.5), MaxSoftmaxPolicy(0.5)]
    for mode in ("mean", "geometric"):
        weights = fit_ensemble_weights(plain, exits, final, labels, mode)
        uniform = ensemble_nll(with_ensemble(plain, mode), exits, final, labels)
        assert ensemble_nll(with_ensemble(plain, mode, weights), exits, final, labels) < uniform
        assert weights[1] > 5 * weights[0], (mode, weights)


def ensemble_bundle(root, kind: str, mode: str, weights=(0.7, 2.5)):
    """A hand-made bundle (known scores) whose exits carry an ensemble, with its cascade.onnx."""
    bundle = handmade.write_bundle(root, kind=kind, threshold=handmade.POLICY_DEFAULTS[kind][0])
    data = read_manifest(bundle)
    for stage, weight in zip(data["stages"][:-1], weights):
        stage["exit"]["policy"].update(ensemble=mode, weight=weight)
    save_manifest(bundle, data)
    manifest = load_manifest(bundle, check_hashes=False)
    save_manifest(bundle, dataclasses.replace(manifest, cascade=write_cascade(manifest)))
    return bundle


SWEEPS = {"max_softmax": [[0.0, 0.0], [0.5, 0.7], [0.8, 0.5], [0.9, 0.95], [1.0, 1.0]],
          "entropy": [[10.0, 10.0], [0.6, 0.9], [0.3, 1.2], [0.1, 0.1], [0.0, 0.0]]}


@pytest.mark.parametrize("kind", sorted(SWEEPS))
@pytest.mark.parametrize("mode", ["mean", "geometric"])
def test_chain_graph_and_simulation_decide_alike_at_batch_1_and_64(tmp_path, kind, mode):
    bundle = ensemble_bundle(tmp_path / "b", kind, mode)
    x, labels = handmade.synthetic_scores(n=64)
    chain, graph = CascadeRunner(bundle, threads=1), GraphRunner(bundle, threads=1)
    assert [p.weights for p in chain.policies] == [(0.7,), (0.7, 2.5)]
    assert load_manifest(bundle).cascade.default("weights") == (0.7, 2.5)
    exit_outputs, final_logits = chain.stage_outputs(x)
    batch1 = ort.InferenceSession(build_cascade(chain.manifest, compact=False).SerializeToString(),
                                  providers=["CPUExecutionProvider"])
    seen = set()
    for thresholds in SWEEPS[kind]:
        want = chain.predict(x, thresholds=thresholds)
        seen |= set(want.exit_index.tolist())
        got = graph.predict(x, thresholds=thresholds)  # batch 64
        np.testing.assert_array_equal(got.predictions, want.predictions)
        np.testing.assert_array_equal(got.exit_index, want.exit_index)
        sim = CascadeSimulator(chain.policies, exit_outputs, final_logits, labels, chain.manifest.exit_costs())
        point = sim.evaluate(thresholds)
        assert point.exit_counts == tuple(want.exit_counts())
        assert point.accuracy == float((want.predictions == labels).mean())
        feeds = graph.feeds(chain.policies_at(thresholds))
        for i in range(0, len(x), 3):  # batch 1: the chain and the compacting graph
            one = chain.predict(x[i : i + 1], thresholds=thresholds)
            assert (one.predictions[0], one.exit_index[0]) == (want.predictions[i], want.exit_index[i])
            _, p, e = graph.run_graph(x[i : i + 1], feeds)
            assert (p[0], e[0]) == (want.predictions[i], want.exit_index[i])
    assert seen == {0, 1, 2}
    want = chain.predict(x)  # the batch-1 graph, a bare session: the manifest's thresholds and weights as constants
    for i in range(len(x)):
        _, p, e = batch1.run(None, {"input": x[i : i + 1]})
        assert (p[0], e[0]) == (want.predictions[i], want.exit_index[i])
    # the weights are a graph input too: other weights give the chain's decisions at those weights
    other = with_ensemble(chain.policies, mode, [3.0, 0.2])
    fed = graph.run_graph(x, graph.feeds(other))
    chain.policies = other
    np.testing.assert_array_equal(fed[1], chain.predict(x).predictions)


def test_ensemble_in_the_manifest_is_typed_and_validated(tmp_path):
    bundle = ensemble_bundle(tmp_path / "b", "max_softmax", "mean")
    spec = load_manifest(bundle).exits[1].policy
    assert (spec.ensemble, spec.weight) == ("mean", 2.5)
    assert json.loads((bundle / MANIFEST_NAME).read_text())["stages"][1]["exit"]["policy"]["ensemble"] == "mean"
    plain = handmade.write_bundle(tmp_path / "plain", kind="max_softmax", threshold=0.7)
    assert "ensemble" not in read_manifest(plain)["stages"][0]["exit"]["policy"]  # bundles without one are unchanged
    assert load_manifest(plain).exits[0].policy.ensemble == "none"
    good = (bundle / MANIFEST_NAME).read_text()
    for key, value, message in (("ensemble", "median", "must be one of none, mean, geometric"),
                                ("weight", -1.0, "must be a finite number > 0")):
        data = json.loads(good)
        data["stages"][0]["exit"]["policy"][key] = value
        (bundle / MANIFEST_NAME).write_text(json.dumps(data))
        with pytest.raises(BundleError, match=message):
            load_manifest(bundle)
    data = json.loads(good)
    data["stages"][1]["exit"]["policy"].update(ensemble="geometric")
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(BundleError, match="different ensembles \\(geometric, mean\\)"):
        CascadeRunner(bundle)


def test_run_can_switch_the_ensemble_on_the_chain(tmp_path):
    bundle = ensemble_bundle(tmp_path / "b", "max_softmax", "mean")
    x, _ = handmade.synthetic_scores(n=64)
    assert isinstance(open_runner(bundle, ensemble="mean"), GraphRunner)  # the graph has this one compiled in
    runner = open_runner(bundle, ensemble="geometric")
    assert isinstance(runner, CascadeRunner) and [p.weights for p in runner.policies] == [(1.0,), (1.0, 1.0)]
    none = open_runner(bundle, ensemble="none").predict(x, thresholds=0.7)
    plain = CascadeRunner(handmade.write_bundle(tmp_path / "plain", kind="max_softmax", threshold=0.7)).predict(x)
    np.testing.assert_array_equal(none.exit_index, plain.exit_index)
    with pytest.raises(ConfigError, match="--ensemble needs the stage-chain engine"):
        open_runner(bundle, engine="graph", ensemble="geometric")
    # a policy that reads no probabilities runs without the bundle's ensemble
    confidence = open_runner(bundle, policy="confidence")
    assert [p.ensemble for p in confidence.policies] == ["none", "none"]
