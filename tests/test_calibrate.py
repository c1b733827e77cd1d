"""Calibration: the search reaches the brute-force optimum of its grid for every policy, accuracy target and
cost budget, met and not met (the `met: false` record and the CLI line); what it simulates is what the
cascade then does; its record reloads."""
from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import handmade
from edgeexit.cli import main
from edgeexit.runtime.calibrate import CascadeSimulator, calibrate, choose_thresholds, shared_grids
from edgeexit.runtime.bundle import save_calibration
from edgeexit.runtime.calibration import CalibrationOptions, calibrate_bundle, parse_objective
from edgeexit.runtime.cascade import CascadeRunner
from edgeexit.runtime.datasets import load_eval_data
from edgeexit.errors import ConfigError
from edgeexit.runtime.manifest import load_manifest
from edgeexit.runtime.policies import POLICIES, get_policy


@pytest.fixture()
def bundle_copy(tiny_bundle, tmp_path):
    """A private copy of the tiny bundle: calibration rewrites its manifest."""
    return shutil.copytree(tiny_bundle, tmp_path / "bundle")


@pytest.fixture(scope="module")
def digits_val(tiny_bundle):
    return load_eval_data("digits", "val", load_manifest(tiny_bundle).input_spec)


def measured(bundle, x, y):
    runner = CascadeRunner(bundle, threads=1)
    result = runner.predict(x)
    return float((result.predictions == y).mean()), runner.relative_macs(result), runner


KINDS = sorted(handmade.POLICY_DEFAULTS)


@pytest.mark.parametrize("kind", KINDS)
def test_calibrated_bundle_reloads_and_the_real_cascade_agrees(handmade_bundles, tmp_path, kind):
    """Every policy (class exclusion included) on a bundle where every stage takes inputs: what calibration
    simulated is what the real cascade then does with the thresholds it wrote."""
    x, y = handmade.synthetic_scores(n=200, seed=3)
    bundle = shutil.copytree(handmade_bundles[kind], tmp_path / "bundle")
    for objective in [("budget", 0.7), ("target_drop", 2.0)]:
        # exclusion: beta fixed for the budget (as `calibrate --beta`), searched per exit for the drop
        record = calibrate(CascadeRunner(bundle, threads=1), x, y, objective, search_beta=objective[0] == "target_drop")
        save_calibration(bundle, record)
        accuracy, macs, runner = measured(bundle, x, y)
        chosen = record["chosen"]
        assert runner.thresholds == pytest.approx(chosen["thresholds"])
        assert accuracy == pytest.approx(chosen["accuracy"]) and macs == pytest.approx(chosen["relative_macs"])
        assert list(runner.predict(x).exit_counts()) == chosen["exit_counts"]


def test_calibration_reloads_from_manifest(bundle_copy, digits_val):
    x, y = digits_val
    record = calibrate(CascadeRunner(bundle_copy), x, y, ("target_drop", 1.0), {"name": "digits", "split": "val"})
    save_calibration(bundle_copy, record)
    stored = load_manifest(bundle_copy).calibration
    assert stored == json.loads(json.dumps(record))
    assert stored["data"] == {"name": "digits", "split": "val", "samples": len(x)}
    assert len(stored["curve"]) > 2 and stored["pareto"]
    assert CascadeRunner(bundle_copy).thresholds == pytest.approx(record["chosen"]["thresholds"])


def test_calibrate_bundle_writes_what_its_typed_record_says(bundle_copy, digits_val):
    """calibrate_bundle (what `edgeexit calibrate` calls): the Calibration it returns is the stored record, and
    the bundle then runs at its thresholds with its measured accuracy."""
    x, y = digits_val
    options = CalibrationOptions(objective=parse_objective(budget=0.8), data={"name": "digits", "split": "val"}, threads=1)
    result = calibrate_bundle(bundle_copy, x, y, options)
    stored = load_manifest(bundle_copy).calibration
    assert stored == json.loads(json.dumps(result.record)) and stored["objective"] == {"budget": 0.8}
    assert result.objective == {"budget": 0.8} and result.policy == stored["policy"]
    assert list(result.thresholds) == stored["chosen"]["thresholds"] and list(result.temperatures) == stored["temperatures"]
    assert result.met == stored["chosen"]["met"] and result.betas is None
    accuracy, macs, runner = measured(bundle_copy, x, y)
    assert runner.thresholds == pytest.approx(result.thresholds)
    assert accuracy == pytest.approx(result.chosen["accuracy"]) and macs == pytest.approx(result.chosen["relative_macs"])
    assert macs <= 0.8 + 1e-9
    assert result.needs_rebuild is False and result.manifest.cascade is not None  # same policy: cascade.onnx kept, retuned


@pytest.mark.parametrize("kwargs, message", [
    ({}, "give exactly one of --target-drop POINTS, --budget FRACTION or --latency-budget MS"),
    ({"target_drop": 1.0, "latency_budget": 2.0}, "give exactly one of"),
    ({"budget": 1.5}, "--budget must be a fraction"),
    ({"latency_budget": -1.0}, "--latency-budget must be a positive number"),
    ({"latency_budget": 1.0, "required": False, "allowed": ("target_drop", "budget")},
     "give at most one of --target-drop POINTS or --budget FRACTION"),
])
def test_the_one_objective_parser_refuses_in_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_objective(**kwargs)
    assert parse_objective(required=False) is None and parse_objective(target_drop=0.5) == ("target_drop", 0.5)


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
    assert load_manifest(bundle_copy).calibration["objective"] == {"budget": 0.9}
    both = cli.invoke(main, ["calibrate", str(bundle_copy), "--target-drop", "1", "--budget", "0.5"])
    assert both.exit_code == ConfigError.exit_code
    assert "Traceback" not in both.output


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


def synthetic_outputs(seed: int = 0):
    """Known exit outputs as the runtime reads them (float32), the final logits and the labels."""
    x, labels = handmade.synthetic_scores(n=300, seed=seed)
    return (*handmade.runtime_outputs(handmade.Layout(), x), labels)


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


COSTS = [0.3, 0.6, 1.0]


def brute_force(kind: str, args: dict, outputs, final, labels, objective) -> tuple[dict, bool]:
    """Every combination of the candidate thresholds, evaluated with the compacting loop; the best point
    by the objective's own rule (met first, then cost or accuracy), and whether it meets the target."""
    make = lambda: [get_policy(kind)(get_policy(kind).threshold_range[0], dict(args)) for _ in outputs]  # noqa: E731
    grids = shared_grids(make(), outputs)
    points = []
    for thresholds in itertools.product(*grids):
        preds, exit_index = compacting_reference(make(), outputs, final, thresholds)
        points.append({"accuracy": float((preds == labels).mean()), "relative_macs": float(np.asarray(COSTS)[exit_index].mean())})
    name, value = objective
    reference = float((final.argmax(1) == labels).mean())
    if name == "target_drop":
        ok = [p for p in points if p["accuracy"] >= reference - value / 100 - 1e-12]
        if ok:
            return min(ok, key=lambda p: (p["relative_macs"], -p["accuracy"])), True
        return max(points, key=lambda p: (p["accuracy"], -p["relative_macs"])), False
    ok = [p for p in points if p["relative_macs"] <= value + 1e-12]
    if ok:
        return max(ok, key=lambda p: (p["accuracy"], -p["relative_macs"])), True
    return min(points, key=lambda p: (p["relative_macs"], -p["accuracy"])), False


# (policy, args, objective, met?): both objectives met and not met; exclusion at a high beta exits too
# many inputs early for any floor T to keep the final classifier's accuracy
def met_args(kind: str, objective) -> dict:
    """The policy's default args, except that exclusion needs beta 0 (the floor T alone) to keep accuracy."""
    args = handmade.POLICY_DEFAULTS[kind][1]
    return {"beta": 0.0} if kind == "exclusion" and objective[0] == "target_drop" else args


BRUTE_FORCE_CASES = [
    *[(kind, met_args(kind, objective), objective, True) for kind in sorted(handmade.POLICY_DEFAULTS)
      for objective in [("target_drop", 0.0), ("target_drop", 3.0), ("budget", 0.5), ("budget", 0.8)]],
    *[(kind, args, ("budget", 0.2), False) for kind, (_, args) in sorted(handmade.POLICY_DEFAULTS.items())],
    ("exclusion", {"beta": 0.9}, ("target_drop", 0.0), False),
]


@pytest.mark.parametrize("kind, args, objective, met", BRUTE_FORCE_CASES,
                         ids=[f"{c[0]}-{c[2][0]}-{c[2][1]}-{'met' if c[3] else 'not-met'}" for c in BRUTE_FORCE_CASES])
def test_search_finds_the_brute_force_optimum(kind, args, objective, met):
    outputs, final, labels = synthetic_outputs(seed=5)
    best, feasible = brute_force(kind, args, outputs, final, labels, objective)
    assert feasible == met, "the case does not test what its id says"
    policies = [get_policy(kind)(get_policy(kind).threshold_range[0], dict(args)) for _ in outputs]
    chosen = choose_thresholds(policies, outputs, final, labels, COSTS, objective)["chosen"]
    assert chosen["met"] is met
    assert chosen["accuracy"] == pytest.approx(best["accuracy"]) and chosen["relative_macs"] == pytest.approx(best["relative_macs"])


def test_cli_reports_a_target_it_cannot_meet(bundle_copy):
    costs = load_manifest(bundle_copy).exit_costs()
    budget = costs[0] / 2  # below what leaving at the first exit costs: no threshold reaches it
    result = CliRunner().invoke(main, ["calibrate", str(bundle_copy), "--budget", f"{budget:.4f}", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "target NOT met (closest point chosen)" in result.stdout
    assert "warning: no candidate meets the target; chose the closest point" in result.stderr
    chosen = load_manifest(bundle_copy).calibration["chosen"]
    assert chosen["met"] is False and chosen["relative_macs"] == pytest.approx(costs[0])


def test_drop_se_is_the_paired_standard_error_against_full_onnx():
    from edgeexit.runtime.simulate import paired_se

    reference = np.array([1, 1, 1, 0, 1, 0, 1, 1], dtype=float)
    cascade = np.array([1, 0, 1, 1, 1, 0, 0, 1], dtype=bool)
    d = reference - cascade  # 0, 1, 0, -1, 0, 0, 1, 0
    assert paired_se(reference, cascade) == pytest.approx(d.std(ddof=1) / np.sqrt(len(d)))
    assert paired_se(reference, reference.astype(bool)) == 0.0  # no disagreement, no uncertainty about the drop
    outputs, final, labels = synthetic_outputs()
    policies = [get_policy("max_softmax")(0.5) for _ in outputs]
    point = CascadeSimulator(policies, outputs, final, labels, COSTS).evaluate([0.6, 0.6])
    preds, _ = compacting_reference(policies, outputs, final, [0.6, 0.6])
    assert point.drop_se == pytest.approx(paired_se((final.argmax(1) == labels).astype(float), preds == labels))


@pytest.mark.parametrize("kind", ["max_softmax", "entropy", "confidence"])
def test_a_confidence_level_keeps_the_target_with_its_margin_and_costs_more(kind):
    from statistics import NormalDist

    outputs, final, labels = synthetic_outputs(seed=3)
    make = lambda: [get_policy(kind)(get_policy(kind).threshold_range[0]) for _ in outputs]  # noqa: E731
    plain = choose_thresholds(make(), outputs, final, labels, COSTS, ("target_drop", 2.0))["chosen"]
    record = choose_thresholds(make(), outputs, final, labels, COSTS, ("target_drop", 2.0), confidence=0.95)
    chosen, floor = record["chosen"], record["reference_accuracy"] - 0.02
    assert record["objective"] == {"target_drop": 2.0, "confidence_level": 0.95}
    assert chosen["met"] and chosen["drop_se"] > 0
    assert chosen["accuracy"] - NormalDist().inv_cdf(0.95) * chosen["drop_se"] >= floor - 1e-12
    assert plain["accuracy"] - NormalDist().inv_cdf(0.95) * plain["drop_se"] < floor  # the plain point has no margin
    assert chosen["relative_macs"] > plain["relative_macs"]


def test_cli_calibrate_at_a_confidence_level_reports_the_margin(bundle_copy):
    result = CliRunner().invoke(main, ["calibrate", str(bundle_copy), "--data", "digits", "--target-drop", "2",
                                       "--confidence-level", "0.9"])
    assert result.exit_code == 0, result.output
    record = load_manifest(bundle_copy).calibration
    assert record["objective"] == {"target_drop": 2.0, "confidence_level": 0.9}
    se = record["chosen"]["drop_se"]
    assert f"standard error {100 * se:.2f} (paired): the target holds at confidence 0.9 with the margin" in result.output


@pytest.mark.parametrize("args, message", [
    (["--budget", "0.5", "--confidence-level", "0.9"], "use it with --target-drop"),
    (["--target-drop", "0.5", "--confidence-level", "1"], "must be in [0.5, 1)"),
])
def test_cli_refuses_a_confidence_level_it_cannot_use(bundle_copy, args, message):
    before = (bundle_copy / "manifest.json").read_text()
    result = CliRunner().invoke(main, ["calibrate", str(bundle_copy), "--data", "digits", *args])
    assert result.exit_code == ConfigError.exit_code and message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert (bundle_copy / "manifest.json").read_text() == before
