"""Device latency profiles, latency prediction, and calibration to a latency budget."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgeexit.cli import main
from edgeexit.runtime.calibrate import LatencyTarget, choose_thresholds, shared_grids
from edgeexit.errors import BundleError, ConfigError
from edgeexit.runtime.latency import budget_latency, current_host, mixture_quantile, predict_latency
from edgeexit.runtime.profiles import DeviceProfile, Timing
from edgeexit.runtime.manifest import load_manifest, read_manifest
from edgeexit.runtime.policies import ConfidencePolicy, logit


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def timing(p50: float, spread: float = 0.1) -> Timing:
    """A narrow synthetic latency distribution around p50 (ms)."""
    return Timing(mean=p50, min=p50 * (1 - spread), p50=p50, p95=p50 * (1 + spread), p99=p50 * (1 + 2 * spread))


def synthetic_profile(exit_ms, batch_size: int = 1, at_one_ms=None) -> DeviceProfile:
    exits = tuple(timing(v) for v in exit_ms)
    at_one = exits if at_one_ms is None else tuple(timing(v) for v in at_one_ms)
    return DeviceProfile(host="board", device="cpu", threads=1, batch_size=batch_size, engine="chain", stages=exits,
                         exits=exits, exits_at_one=at_one, full=timing(exit_ms[-1] * 0.9), repeats=10,
                         providers=("CPUExecutionProvider",), onnxruntime="test")


@pytest.fixture(scope="module")
def profiled_bundle(tmp_path_factory, tiny_bundle):
    """The tiny bundle with three profiles measured here, one thread: the stage chain at batch 1 and 4, and
    cascade.onnx (the engine `run` picks by default) at batch 1."""
    import shutil

    bundle = shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("profiled") / "bundle")
    for engine, batch in (("chain", 1), ("chain", 4), ("auto", 1)):
        result = cli("profile", bundle, "--engine", engine, "--threads", 1, "--batch-size", batch, "--repeats", 60)
        assert result.exit_code == 0, result.output
    return bundle


def test_profiles_coexist_with_positive_increasing_costs(profiled_bundle):
    manifest = load_manifest(profiled_bundle)
    profiles = manifest.profiles
    host = current_host()
    assert set(profiles) == {f"{host}/cpu/t1/b1/chain", f"{host}/cpu/t1/b4/chain", f"{host}/cpu/t1/b1/graph"}
    raw = read_manifest(profiled_bundle)["profiles"][f"{host}/cpu/t1/b1/chain"]
    assert set(raw["full"]) >= {"p50", "p95"} and raw["full"]["p50"] > 0
    for profile in profiles.values():
        assert len(profile.stages) == len(profile.exits) == len(manifest.stages)
        for t in (*profile.exits, profile.full, *(profile.stages if profile.engine == "chain" else ())):
            assert 0 < t.min <= t.p50 <= t.p95 <= t.p99 and t.mean > 0
        # cascade.onnx is one session run: its stages are the steps between the cumulative exit costs
        if profile.engine == "graph":
            assert profile.stages[0] == profile.exits[0]
            assert sum(t.mean for t in profile.stages) == pytest.approx(profile.exits[-1].mean) or any(
                later.mean < earlier.mean for earlier, later in zip(profile.exits, profile.exits[1:]))
        # leaving later runs more stages: the cumulative cost rises exit by exit
        medians = [t.p50 for t in profile.exits]
        assert medians == sorted(medians) and medians[-1] > medians[0]
    assert profiles[f"{host}/cpu/t1/b4/chain"].full.p50 > profiles[f"{host}/cpu/t1/b1/chain"].full.p50


def test_profile_survives_calibration_and_info_lists_it(profiled_bundle):
    result = cli("calibrate", profiled_bundle, "--target-drop", 1)
    assert result.exit_code == 0, result.output
    assert len(load_manifest(profiled_bundle).profiles) == 3
    info = cli("info", profiled_bundle)
    assert f"profile {current_host()}/cpu/t1/b1/chain" in info.output


def test_run_reports_expected_latency_only_with_a_matching_profile(profiled_bundle, tmp_path):
    for engine in ("graph", "chain"):  # each engine's report reads its own profile
        with_profile = tmp_path / f"b1-{engine}.json"
        assert cli("run", profiled_bundle, "--threads", 1, "--engine", engine, "--json", with_profile).exit_code == 0
        report = json.loads(with_profile.read_text())
        assert report["predicted_latency_ms"] > 0 and report["measured_latency_ms"] > 0
        assert report["expected_latency"]["profile"] == f"{current_host()}/cpu/t1/b1/{engine}"
    without = tmp_path / "t2.json"
    assert cli("run", profiled_bundle, "--threads", 2, "--json", without).exit_code == 0
    assert json.loads(without.read_text())["predicted_latency_ms"] is None


def test_batch_one_prediction_is_the_mixture_mean_and_quantile():
    profile = synthetic_profile([1.0, 2.0, 4.0])
    assert predict_latency(profile, [6, 3, 1], "mean") == pytest.approx(0.6 * 1 + 0.3 * 2 + 0.1 * 4)
    assert predict_latency(profile, [0, 5, 0], "p95") == pytest.approx(2.2)  # one component: its own p95
    # 90% leave at exit 0, so the 95th percentile lies halfway into exit 2's share: exit 2's median
    assert mixture_quantile(profile.exits, np.array([0.9, 0.0, 0.1]), 0.95) == pytest.approx(4.0)
    assert predict_latency(profile, [9, 0, 1], "p50") == pytest.approx(1.0 * (1 + 0.1 * (0.5 / 0.9 - 0.5) / 0.45))


def test_batch_prediction_spans_the_measured_extremes():
    profile = synthetic_profile([10.0, 20.0, 40.0], batch_size=8, at_one_ms=[2.0, 4.0, 8.0])
    assert predict_latency(profile, [8, 0, 0]) == pytest.approx(10.0)
    assert predict_latency(profile, [0, 0, 8]) == pytest.approx(40.0)
    mixed = predict_latency(profile, [4, 2, 2])
    assert 10.0 < mixed < 40.0
    # half the batch reaches stage 1 and a quarter stage 2: affine in the survivors, never below linear scaling
    assert mixed >= 10.0 + 0.5 * 10.0 + 0.25 * 20.0


def synthetic_cascade(n: int = 400, classes: int = 4, seed: int = 0):
    """Two confidence exits whose confidence tracks correctness, plus an accurate final stage."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    outputs = []
    for quality in (0.6, 0.8):
        right = rng.random(n) < quality
        predicted = np.where(right, labels, (labels + 1) % classes)
        logits = np.eye(classes, dtype=np.float32)[predicted] * 3
        confidence = np.clip(np.where(right, 0.6, 0.3) + rng.normal(0, 0.2, n), 0.01, 0.99)
        z = (np.log(confidence) - np.log1p(-confidence)).astype(np.float32)  # exits output the confidence logit
        outputs.append({"logits": logits, "confidence_logit": z[:, None]})
    final_right = rng.random(n) < 0.95
    final = np.eye(classes, dtype=np.float32)[np.where(final_right, labels, (labels + 2) % classes)]
    return outputs, final, labels


@pytest.mark.parametrize("budget,percentile", [(1.6, "mean"), (2.2, "mean"), (3.0, "95"), (3.9, "95"), (4.2, "99")])
def test_latency_budget_calibration_matches_brute_force(budget, percentile):
    outputs, final, labels = synthetic_cascade()
    policies = [ConfidencePolicy(0.5), ConfidencePolicy(0.5)]
    target = LatencyTarget(synthetic_profile([1.0, 2.0, 4.0]), percentile)
    record = choose_thresholds(policies, outputs, final, labels, [0.3, 0.6, 1.0], ("latency", budget), latency=target)
    best = -1.0
    for thresholds in itertools.product(*shared_grids(policies, outputs)):
        exit_index = np.full(len(labels), 2)
        predictions = final.argmax(axis=1)
        for k in reversed(range(2)):
            leave = outputs[k]["confidence_logit"][:, 0].astype(np.float64) >= logit(thresholds[k])
            exit_index[leave] = k
            predictions = np.where(leave, outputs[k]["logits"].argmax(axis=1), predictions)
        counts = np.bincount(exit_index, minlength=3)
        if predict_latency(target.profile, counts, "mean" if percentile == "mean" else f"p{percentile}") <= budget:
            best = max(best, float((predictions == labels).mean()))
    chosen = record["chosen"]
    assert chosen["met"] and chosen["predicted_latency_ms"] <= budget
    assert chosen["accuracy"] == pytest.approx(best)
    bounds = "mean ms per input" if percentile == "mean" else f"p{percentile} ms per call"
    assert record["objective"] == {"latency": budget, "profile": "board/cpu/t1/b1/chain",
                                   "percentile": percentile if percentile == "mean" else int(percentile), "bounds": bounds}
    assert chosen["predicted_latency_bounds"] == bounds


def test_budget_bounds_the_mean_per_input_or_the_tail_per_call():
    profile = synthetic_profile([10.0, 20.0, 40.0], batch_size=8, at_one_ms=[2.0, 4.0, 8.0])
    counts = [4, 2, 2]
    assert budget_latency(profile, counts, "mean") == pytest.approx(predict_latency(profile, counts, "mean") / 8)
    assert budget_latency(profile, counts, "99") == pytest.approx(predict_latency(profile, counts, "p99"))
    assert budget_latency(profile, counts, "99") > budget_latency(profile, counts, "95")
    # at batch 1 a two-mode mixture's tail is the slow mode's, its mean in between
    one = synthetic_profile([1.0, 2.0, 4.0])
    assert budget_latency(one, [5, 0, 5], "95") > 4.0 > budget_latency(one, [5, 0, 5], "mean") == pytest.approx(2.5)
    with pytest.raises(ConfigError, match="choose from: mean, 95, 99"):
        LatencyTarget(one, "50")


def test_budget_below_the_cheapest_exit_names_the_minimum():
    target = LatencyTarget(synthetic_profile([1.0, 2.0, 4.0]), "95")
    with pytest.raises(ConfigError, match=r"p95 ms per call\) is below the cheapest exit.*minimum budget is 1\.1 ms"):
        target.check_budget(1.05)
    per_input = LatencyTarget(synthetic_profile([10.0, 20.0, 40.0], batch_size=8), "mean")
    with pytest.raises(ConfigError, match=r"minimum budget is 1\.25 ms"):
        per_input.check_budget(1.2)


def test_corrupt_profile_is_a_bundle_error(bundle_copy):
    from edgeexit.runtime.files import write_json_atomic

    data = read_manifest(bundle_copy)
    profile = synthetic_profile([1.0, 2.0, 4.0]).to_dict()
    data["profiles"] = {"wrong-name": profile}
    write_json_atomic(bundle_copy / "manifest.json", data)
    with pytest.raises(BundleError, match="key must be 'board/cpu/t1/b1/chain'"):
        load_manifest(bundle_copy)
    data["profiles"] = {"board/cpu/t1/b1/chain": {**profile, "exits": profile["exits"][:1]}}
    write_json_atomic(bundle_copy / "manifest.json", data)
    with pytest.raises(BundleError, match="one entry per stage"):
        load_manifest(bundle_copy)


def test_latency_budget_errors_via_cli(profiled_bundle):
    name = f"{current_host()}/cpu/t1/b1/chain"
    least = load_manifest(profiled_bundle).profiles[name].exits[0].p95
    cases = [
        (["--latency-budget", least / 10, "--percentile", 95, "--profile", name], f"minimum budget is {least:.4g} ms"),
        (["--latency-budget", 5, "--profile", "pi/cpu/t4/b1/chain"], f"has profiles for: {name}, "),
        (["--latency-budget", 0, "--profile", name], "must be a positive number of milliseconds, got 0.0"),
        (["--latency-budget", -2, "--profile", name], "must be a positive number of milliseconds, got -2.0"),
        (["--latency-budget", 5, "--target-drop", 1, "--profile", name], "give exactly one of"),
    ]
    for args, message in cases:
        result = cli("calibrate", profiled_bundle, *args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, result.output)


def test_latency_budget_without_profile_uses_this_hosts_profile_of_the_engine_run_picks(profiled_bundle, tmp_path):
    import shutil

    # the bundle holds chain profiles at batch 1 and 4 and one graph profile: `run` picks the graph
    result = cli("calibrate", profiled_bundle, "--latency-budget", 1000, "--percentile", 99)
    assert result.exit_code == 0, result.output
    record = load_manifest(profiled_bundle).calibration
    assert record["objective"]["profile"] == f"{current_host()}/cpu/t1/b1/graph" and record["objective"]["percentile"] == 99
    assert "(p99 ms per call)" in result.output
    # two graph profiles of this host: ambiguous, so it names both and asks for --profile
    two = shutil.copytree(profiled_bundle, tmp_path / "two")
    assert cli("profile", two, "--threads", 2, "--repeats", 4).exit_code == 0
    result = cli("calibrate", two, "--latency-budget", 1000)
    assert result.exit_code == 2 and "2 profiles of this host" in result.output and "choose one with --profile" in result.output
    assert cli("calibrate", two, "--latency-budget", 1000, "--threads", 2).exit_code == 0  # --threads narrows it to one


def test_latency_budget_without_any_profile_says_how_to_measure_one(bundle_copy):
    result = cli("calibrate", bundle_copy, "--latency-budget", 5)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "has no latency profile of this host" in result.output and "edgeexit profile BUNDLE" in result.output


def test_latency_budget_calibration_via_cli(profiled_bundle):
    name = f"{current_host()}/cpu/t1/b1/chain"
    profile = load_manifest(profiled_bundle).profiles[name]
    budget = 2 * max(timing.mean for timing in profile.exits)  # the default budget bounds the mean; every exit fits it
    result = cli("calibrate", profiled_bundle, "--latency-budget", budget, "--profile", name)
    assert result.exit_code == 0, result.output
    record = load_manifest(profiled_bundle).calibration
    assert record["objective"]["latency"] == budget and record["chosen"]["met"]
    assert record["chosen"]["predicted_latency_ms"] <= budget


def test_latency_placement_reads_measured_fractions():
    from edgeexit.export.cut_latency import latency_candidates
    from edgeexit.train.cuts import CutPoint
    from edgeexit.train.placement import place_exits

    # MACs say the cuts sit at 0.2/0.4/0.6/0.8; measured time says the early ones are slower per MAC
    candidates = [CutPoint(f"c{i}", f"n{i}", (8, 4, 4), int(f * 1000), f) for i, f in enumerate((0.2, 0.4, 0.6, 0.8))]
    measured = {"c0": timing(0.35), "c1": timing(0.55), "c2": timing(0.7), "c3": timing(0.9)}
    by_latency = latency_candidates(candidates, measured, timing(1.0))
    assert [p.fraction for p in by_latency] == pytest.approx([0.35, 0.55, 0.7, 0.9])
    assert [p.name for p in place_exits("linear", 2, candidates)] == ["c1", "c3"]  # targets 1/3, 2/3
    assert [p.name for p in place_exits("linear", 2, by_latency)] == ["c0", "c2"]


@pytest.mark.slow
def test_cuts_profile_times_every_cut_via_cli():
    result = cli("cuts", "--backbone", "resnet8", "--input-size", 16, "--profile", "--repeats", 10)
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines() if line.startswith(("layer", "relu"))]
    assert rows and all(float(row[4]) > 0 for row in rows)  # cum. ms p50
    assert "measured latency fraction" in result.output


def test_placement_cost_is_checked():
    from edgeexit.train.config import TrainSpec

    with pytest.raises(ConfigError, match="choose from: macs, latency"):
        TrainSpec(placement_cost="flops").check()
