"""Calibration meets its target on its data, its thresholds reload, and run-time overrides move exits."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from edgeexit.cli import main
from edgeexit.runtime.calibrate import CascadeSimulator, apply_calibration, calibrate, choose_thresholds
from edgeexit.runtime.cascade import CascadeRunner
from edgeexit.runtime.datasets import load_eval_data
from edgeexit.errors import ConfigError
from edgeexit.runtime.manifest import load_manifest, read_manifest, save_manifest
from edgeexit.runtime.policies import POLICIES, get_policy


@pytest.fixture()
def bundle_copy(tiny_bundle, tmp_path):
    """A private copy of the tiny bundle: calibration rewrites its manifest."""
    return shutil.copytree(tiny_bundle, tmp_path / "bundle")


@pytest.fixture(scope="module")
def digits_val(tiny_bundle):
    return load_eval_data("digits", "val", load_manifest(tiny_bundle).input_spec)


def with_policy(bundle, kind: str, threshold: float = 0.5):
    """Switch every exit of a bundle copy to policy `kind`."""
    data = read_manifest(bundle)
    for stage in data["stages"][:-1]:
        stage["exit"]["policy"] = {"kind": kind, "threshold": threshold, "args": {}}
    save_manifest(bundle, data)
    return bundle


def measured(bundle, x, y):
    runner = CascadeRunner(bundle, threads=1)
    result = runner.predict(x)
    return float((result.predictions == y).mean()), runner.relative_macs(result), runner


def policies_for(bundle) -> list[str]:
    roles = set(load_manifest(bundle).exits[0]["outputs"])
    return sorted(kind for kind, cls in POLICIES.items() if set(cls.roles) <= roles)


@pytest.mark.parametrize("drop", [0.0, 3.0])
def test_target_drop_met_and_real_cascade_agrees(bundle_copy, digits_val, drop):
    x, y = digits_val
    record = calibrate(CascadeRunner(bundle_copy, threads=1), x, y, ("target_drop", drop))
    apply_calibration(bundle_copy, record)
    chosen = record["chosen"]
    assert chosen["met"]
    assert chosen["accuracy"] >= record["reference_accuracy"] - drop / 100 - 1e-9
    accuracy, macs, runner = measured(bundle_copy, x, y)
    assert runner.thresholds == pytest.approx(chosen["thresholds"])
    assert accuracy == pytest.approx(chosen["accuracy"])
    assert macs == pytest.approx(chosen["relative_macs"])


def test_more_allowed_drop_never_costs_more(bundle_copy, digits_val):
    x, y = digits_val
    runner = CascadeRunner(bundle_copy, threads=1)
    strict = calibrate(runner, x, y, ("target_drop", 0.0))["chosen"]
    loose = calibrate(runner, x, y, ("target_drop", 5.0))["chosen"]
    assert loose["relative_macs"] <= strict["relative_macs"] + 1e-9


@pytest.mark.parametrize("kind", ["confidence", "max_softmax", "entropy", "exclusion"])
def test_budget_met_for_every_policy(bundle_copy, digits_val, kind):
    if kind not in policies_for(bundle_copy):
        pytest.skip(f"policy {kind} is not available for this bundle")
    x, y = digits_val
    with_policy(bundle_copy, kind)
    costs = load_manifest(bundle_copy).exit_costs()
    budget = (costs[0] + 1.0) / 2
    record = calibrate(CascadeRunner(bundle_copy, threads=1), x, y, ("budget", budget))
    apply_calibration(bundle_copy, record)
    accuracy, macs, _ = measured(bundle_copy, x, y)
    assert record["chosen"]["met"]
    assert macs <= budget + 1e-9
    assert accuracy == pytest.approx(record["chosen"]["accuracy"])
    # the chosen point is the most accurate of every evaluated point within budget on the stored curve
    within = [p["accuracy"] for p in record["curve"] if p["relative_macs"] <= budget + 1e-9]
    assert record["chosen"]["accuracy"] >= max(within) - 1e-9


def test_calibration_reloads_from_manifest(bundle_copy, digits_val):
    x, y = digits_val
    record = calibrate(CascadeRunner(bundle_copy), x, y, ("target_drop", 1.0), {"name": "digits", "split": "val"})
    apply_calibration(bundle_copy, record)
    stored = load_manifest(bundle_copy).data["calibration"]
    assert stored == json.loads(json.dumps(record))
    assert stored["data"] == {"name": "digits", "split": "val", "samples": len(x)}
    assert len(stored["curve"]) > 2 and stored["pareto"]
    assert CascadeRunner(bundle_copy).thresholds == pytest.approx(record["chosen"]["thresholds"])


def test_bad_objectives_are_config_errors(bundle_copy, digits_val):
    x, y = digits_val
    runner = CascadeRunner(bundle_copy)
    for objective in [("budget", 0.0), ("budget", 1.5), ("target_drop", -1.0)]:
        with pytest.raises(ConfigError):
            calibrate(runner, x, y, objective)


def test_cli_calibrate_writes_manifest(bundle_copy):
    cli = CliRunner()
    result = cli.invoke(main, ["calibrate", str(bundle_copy), "--data", "digits", "--budget", "0.9"])
    assert result.exit_code == 0, result.output
    assert "operating point" in result.output
    assert load_manifest(bundle_copy).data["calibration"]["objective"] == {"budget": 0.9}
    both = cli.invoke(main, ["calibrate", str(bundle_copy), "--target-drop", "1", "--budget", "0.5"])
    assert both.exit_code == ConfigError.exit_code
    assert "Traceback" not in both.output


def test_raising_shared_threshold_never_adds_early_exits(tiny_bundle, digits_test):
    x, _ = digits_test
    runner = CascadeRunner(tiny_bundle, threads=1)
    early, macs = [], []
    for threshold in np.linspace(0.0, 1.0, 11):
        runner.set_thresholds(float(threshold))
        result = runner.predict(x)
        early.append(int((result.exit_index < runner.num_exits).sum()))
        macs.append(runner.relative_macs(result))
    assert early[0] == len(x)  # confidence >= 0 always exits at the first exit
    assert all(a >= b for a, b in zip(early, early[1:]))
    assert all(a <= b + 1e-12 for a, b in zip(macs, macs[1:]))


def test_per_exit_override_changes_only_that_exit(tiny_bundle, digits_test):
    x, _ = digits_test
    runner = CascadeRunner(tiny_bundle, threads=1)
    runner.set_thresholds([1.0, 0.0])  # exit 0 never, exit 1 always
    counts = runner.predict(x).exit_counts()
    assert counts[-1] == 0 and sum(counts) == len(x)
    runner.set_thresholds([0.0, 1.0])
    assert runner.predict(x).exit_counts()[0] == len(x)


def test_cli_run_threshold_override(tiny_bundle, tmp_path):
    report = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["run", str(tiny_bundle), "--threshold", "0", "--threads", "1",
                                       "--json", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["exit_counts"][0] == data["samples"] and data["thresholds"] == [0.0, 0.0]


def synthetic_outputs(n: int = 300, classes: int = 5, exits: int = 2, seed: int = 0):
    """Random exit outputs for every role a policy may read, noisier at earlier exits, plus labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    onehot = np.eye(classes)[labels]
    outputs = []
    for k in range(exits):
        logits = onehot * (1.0 + k) * 3 + rng.normal(0, 2.0, (n, classes))
        outputs.append({"logits": logits.astype(np.float32),
                        "confidence_logit": (logits.max(1) - 3).astype(np.float32)[:, None],
                        "exclusion": (1 / (1 + np.exp(-(logits - 2)))).astype(np.float32)})
    final = (onehot * 8 + rng.normal(0, 2.0, (n, classes))).astype(np.float32)
    return outputs, final, labels


def compacting_reference(policies, outputs, final, thresholds):
    """The cascade's loop (survivors compacted, state indexed with them) on stored outputs."""
    n = len(final)
    alive, exit_index, preds = np.arange(n), np.full(n, len(policies)), np.empty(n, dtype=np.int64)
    state = policies[0].start(n, final.shape[1])
    for k, (policy, threshold) in enumerate(zip(policies, thresholds)):
        policy.threshold = threshold
        exits, p, state = policy.decide({role: v[alive] for role, v in outputs[k].items()}, state)
        exit_index[alive[exits]], preds[alive[exits]] = k, p[exits]
        alive, state = alive[~exits], None if state is None else state[~exits]
    preds[alive] = policies[-1].final(final[alive], state)
    return preds, exit_index


@pytest.mark.parametrize("kind", sorted(POLICIES))
def test_search_is_generic_over_policies(kind):
    outputs, final, labels = synthetic_outputs()
    costs = [0.3, 0.6, 1.0]
    make = lambda: [get_policy(kind)(get_policy(kind).threshold_range[0]) for _ in outputs]  # noqa: E731
    record = choose_thresholds(make(), outputs, final, labels, costs, ("budget", 0.7))
    chosen = record["chosen"]
    preds, exit_index = compacting_reference(make(), outputs, final, chosen["thresholds"])
    assert chosen["met"] and chosen["relative_macs"] <= 0.7
    assert chosen["accuracy"] == pytest.approx((preds == labels).mean())
    assert chosen["relative_macs"] == pytest.approx(np.asarray(costs)[exit_index].mean())
    sim = CascadeSimulator(make(), outputs, final, labels, costs)
    for point in record["curve"][:: max(1, len(record["curve"]) // 5)]:
        preds, exit_index = compacting_reference(make(), outputs, final, point["thresholds"])
        assert sim.evaluate(point["thresholds"]).accuracy == pytest.approx((preds == labels).mean())
