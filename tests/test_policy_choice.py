"""The exit score is chosen, not fixed: run --policy, calibrate --policy auto|NAME, per-exit temperatures."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgeexit.cli import main
from edgeexit.runtime.bundle import save_calibration
from edgeexit.runtime.calibrate import calibrate, fit_temperature, temperature_nll
from edgeexit.runtime.cascade import CascadeRunner
from edgeexit.runtime.datasets import load_eval_data
from edgeexit.runtime.graph import GraphRunner
from edgeexit.errors import BundleError, ConfigError
from edgeexit.runtime.manifest import load_manifest, read_manifest
from edgeexit.runtime.bundle import save_manifest
from edgeexit.runtime.policies import softmax


@pytest.fixture(scope="module")
def digits_val(tiny_bundle):
    return load_eval_data("digits", "val", load_manifest(tiny_bundle).input_spec)


def set_temperatures(bundle, temperatures) -> None:
    data = read_manifest(bundle)
    for stage, t in zip(data["stages"][:-1], temperatures):
        stage["exit"]["temperature"] = t
    save_manifest(bundle, data)


def reference_exits(runner: CascadeRunner, x: np.ndarray, leaves) -> np.ndarray:
    """First exit where leaves(softmax(logits / temperature)) holds, by numpy on every stage's outputs."""
    outputs, _ = runner.stage_outputs(x)
    taken = np.stack([leaves(softmax(o["logits"].astype(np.float64) / p.temperature))
                      for o, p in zip(outputs, runner.policies)], axis=1)
    return np.where(taken.any(1), taken.argmax(1), runner.num_exits)


def entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.clip(p, 1e-12, None))).sum(1)


def test_fit_temperature_recovers_an_overconfident_scale():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (4000, 5))
    labels = np.array([rng.choice(5, p=p) for p in softmax(z)])  # labels drawn from softmax(z): T = 1 is right for z
    fitted = fit_temperature(3 * z, labels)  # logits three times too sharp
    assert fitted == pytest.approx(3.0, rel=0.1)
    assert temperature_nll(3 * z, labels, fitted) < temperature_nll(3 * z, labels, 1.0)


def test_exported_exits_carry_temperature_one(tiny_bundle):
    assert [spec.temperature for spec in load_manifest(tiny_bundle).exits] == [1.0, 1.0]
    assert [p.temperature for p in CascadeRunner(tiny_bundle).policies] == [1.0, 1.0]


@pytest.mark.parametrize("policy, threshold, leaves", [
    ("max_softmax", 0.9, lambda p: p.max(1) >= 0.9),
    ("entropy", 0.3, lambda p: entropy(p) <= 0.3),
])
def test_run_with_another_policy_applies_the_manifest_temperature(bundle_copy, digits_val, policy, threshold, leaves):
    """A confidence bundle runs with a softmax policy; the reloaded temperature divides the logits."""
    x, _ = digits_val
    untempered = CascadeRunner(bundle_copy, threads=1, policy=policy, thresholds=threshold).predict(x)
    set_temperatures(bundle_copy, [2.5, 0.5])
    runner = CascadeRunner(bundle_copy, threads=1, policy=policy, thresholds=threshold)
    assert [p.name for p in runner.policies] == [policy, policy]
    assert [p.temperature for p in runner.policies] == [2.5, 0.5]
    result = runner.predict(x)
    np.testing.assert_array_equal(result.exit_index, reference_exits(runner, x, leaves))
    assert result.exit_counts() != untempered.exit_counts()


def test_calibrate_auto_records_policy_thresholds_and_temperatures(bundle_copy, digits_val):
    x, y = digits_val
    record = calibrate(CascadeRunner(bundle_copy, threads=1), x, y, ("target_drop", 1.0), policy="auto")
    # auto tries each score policy, and each policy that reads probabilities with each ensemble at deferral too
    assert set(record["candidates"]) == {"confidence", "max_softmax", "entropy", "max_softmax+mean", "max_softmax+geometric",
                                         "entropy+mean", "entropy+geometric"}
    mode = record["ensemble"]["mode"]
    label = record["policy"] + ("" if mode == "none" else f"+{mode}")
    assert label in record["candidates"] and record["policies"] == [record["policy"]] * 2
    best = record["candidates"][label]
    assert all(c["relative_macs"] >= best["relative_macs"] - 1e-12 for c in record["candidates"].values() if c["met"])
    assert all(t != 1.0 and 0.05 <= t <= 20 for t in record["temperatures"])
    save_calibration(bundle_copy, record)
    reloaded = CascadeRunner(bundle_copy, threads=1)
    assert [p.name for p in reloaded.policies] == record["policies"]
    assert [p.temperature for p in reloaded.policies] == pytest.approx(record["temperatures"])
    assert reloaded.thresholds == pytest.approx(record["chosen"]["thresholds"])
    assert [p.ensemble for p in reloaded.policies] == [mode] * 2
    if mode != "none":
        assert list(reloaded.policies[-1].weights) == pytest.approx(record["ensemble"]["weights"])
    result = reloaded.predict(x)  # the real cascade at the recorded policy reproduces the calibrated point
    assert float((result.predictions == y).mean()) == pytest.approx(record["chosen"]["accuracy"])
    assert result.exit_counts() == record["chosen"]["exit_counts"]


def test_cli_calibrate_and_run_take_a_policy(bundle_copy, tmp_path):
    cli = CliRunner()
    result = cli.invoke(main, ["calibrate", str(bundle_copy), "--target-drop", "2", "--policy", "max_softmax"])
    assert result.exit_code == 0, result.output
    assert "policy max_softmax" in result.output
    assert load_manifest(bundle_copy).exits[0].policy.kind == "max_softmax"
    # cascade.onnx compiled in the old policy: calibrate rebuilds it for the new one and its temperatures
    assert "rebuilt cascade.onnx" in result.output
    manifest = load_manifest(bundle_copy)
    assert manifest.cascade.default("temperature") == pytest.approx([e.temperature for e in manifest.exits])
    x = load_eval_data("digits", "test", manifest.input_spec)[0]
    seen = set()
    for threshold in (None, 0.9, 0.99, 0.999):  # the calibrated point, then mixes that keep inputs for later stages
        graph = GraphRunner(bundle_copy).predict(x, thresholds=threshold)
        chain = CascadeRunner(bundle_copy).predict(x, thresholds=threshold)
        np.testing.assert_array_equal(graph.exit_index, chain.exit_index)
        np.testing.assert_array_equal(graph.predictions, chain.predictions)
        seen |= set(chain.exit_index.tolist())
    assert len(seen) > 1
    # calibrating again with the same policy keeps the graph: thresholds and temperatures go to its input defaults
    again = cli.invoke(main, ["calibrate", str(bundle_copy), "--target-drop", "0.5", "--split", "test"])
    assert again.exit_code == 0 and "cascade.onnx" not in again.output, again.output
    manifest = load_manifest(bundle_copy)
    assert manifest.cascade.default("temperature") == pytest.approx([e.temperature for e in manifest.exits])
    assert manifest.cascade.default("thresholds") == pytest.approx([e.policy.threshold for e in manifest.exits])
    report = tmp_path / "r.json"
    result = cli.invoke(main, ["run", str(bundle_copy), "--policy", "confidence", "--threshold", "0", "--threads", "1",
                               "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["exit_counts"][0] == json.loads(report.read_text())["samples"]
    bad = cli.invoke(main, ["run", str(bundle_copy), "--policy", "nope"])
    assert bad.exit_code == ConfigError.exit_code and "Traceback" not in bad.output
    assert "unknown exit policy 'nope'" in bad.output


def test_bad_temperature_in_manifest_is_a_bundle_error(bundle_copy):
    data = read_manifest(bundle_copy)
    data["stages"][0]["exit"]["temperature"] = 0.0
    (bundle_copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="temperature"):
        load_manifest(bundle_copy)


def test_calibrate_fits_an_ensemble_and_cascade_onnx_runs_it(bundle_copy, tmp_path):
    cli = CliRunner()
    result = cli.invoke(main, ["calibrate", str(bundle_copy), "--target-drop", "1", "--policy", "max_softmax",
                               "--ensemble", "geometric"])
    assert result.exit_code == 0, result.output
    assert "policy max_softmax with geometric ensemble, weights" in result.output and "rebuilt cascade.onnx" in result.output
    manifest = load_manifest(bundle_copy)
    weights = manifest.calibration["ensemble"]["weights"]
    assert [(e.policy.ensemble, e.policy.weight) for e in manifest.exits] == [("geometric", pytest.approx(w)) for w in weights]
    assert manifest.cascade.default("weights") == pytest.approx(weights)
    x, y = load_eval_data("digits", "val", manifest.input_spec)
    chain = CascadeRunner(bundle_copy, threads=1).predict(x)
    graph = GraphRunner(bundle_copy, threads=1).predict(x)
    np.testing.assert_array_equal(graph.exit_index, chain.exit_index)
    np.testing.assert_array_equal(graph.predictions, chain.predictions)
    assert chain.exit_counts() == manifest.calibration["chosen"]["exit_counts"]  # the calibrated point, replayed
    assert float((chain.predictions == y).mean()) == pytest.approx(manifest.calibration["chosen"]["accuracy"])
    # run --ensemble none: the same policy on each exit alone, on the stage chain
    report = tmp_path / "r.json"
    result = cli.invoke(main, ["run", str(bundle_copy), "--ensemble", "none", "--threads", "1", "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["engine"] == "chain"
    bad = cli.invoke(main, ["run", str(bundle_copy), "--ensemble", "median"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output and "none, mean, geometric" in bad.output.replace("'", "")
