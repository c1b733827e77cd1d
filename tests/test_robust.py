"""Corruption families and robust calibration: seeded, shape- and range-keeping corruptions; `--robust` raising a
threshold that a corruption makes unsafe, on a hand-made bundle whose scores the test writes."""
from __future__ import annotations

import json

import numpy as np
import pytest

import handmade
from edgeexit.errors import ConfigError
from edgeexit.runtime.corruptions import CORRUPTIONS, corrupt, corrupt_model_ready, parse_families

SCALE = 20.0  # the hand-made bundle's model inputs are (raw - 0.5) * SCALE: raw [0, 1] holds scores in [-10, 10]
CONFIDENT = "test_confident_exit0"


def confident_exit0(images: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """On packed hand-made rows (raw space): exit 0's logits one-hot and high on a class the final stage does not pick."""
    layout = handmade.Layout()
    rows = images.reshape(len(images), -1).copy()
    final = rows[:, layout.columns(layout.exits, "logits")].argmax(axis=1)
    wrong = (final + 1) % layout.classes
    cols = layout.columns(0, "logits")
    rows[:, cols] = 0.5  # logit 0
    rows[np.arange(len(rows)), cols.start + wrong] = 1.0  # logit +10
    return rows.reshape(images.shape)


if CONFIDENT not in CORRUPTIONS:
    CORRUPTIONS.register(CONFIDENT, confident_exit0)


@pytest.mark.parametrize("family", [f for f in CORRUPTIONS if f != CONFIDENT])
@pytest.mark.parametrize("shape", [(5, 1, 12, 12), (3, 3, 9, 11)])
def test_corruption_keeps_shape_and_range_and_repeats_per_seed(family, shape):
    images = np.random.default_rng(0).random(shape).astype(np.float32)
    images[:, :, :2] = 0.0  # a dark border, as glyphs have
    out = corrupt(images, family, 3, seed=7)
    assert out.shape == images.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.array_equal(out, corrupt(images, family, 3, seed=7))
    assert not np.allclose(out, images, atol=1e-3)
    stronger = corrupt(images, family, 5, seed=7)
    assert np.abs(stronger - images).mean() > np.abs(corrupt(images, family, 1, seed=7) - images).mean()


@pytest.mark.parametrize("family", ["rotation", "translation", "elastic", "noise", "stroke"])
def test_random_families_draw_per_seed(family):
    images = np.random.default_rng(1).random((4, 1, 16, 16)).astype(np.float32)
    assert not np.array_equal(corrupt(images, family, 3, seed=0), corrupt(images, family, 3, seed=1))


def test_corruption_round_trips_through_normalization():
    rng = np.random.default_rng(2)
    raw = rng.random((3, 3, 8, 8)).astype(np.float32)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    x = ((raw - np.array(mean)[None, :, None, None]) / np.array(std)[None, :, None, None]).astype(np.float32)
    got = corrupt_model_ready(x, mean, std, "blur", 2, 0)
    want = (corrupt(raw, "blur", 2, 0) - np.array(mean, np.float32)[None, :, None, None]) / np.array(std, np.float32)[None, :, None, None]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_bad_family_and_severity_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown corruption family 'fog'; choose from: rotation"):
        parse_families("rotation,fog")
    with pytest.raises(ConfigError, match="severity must be an integer 1..5"):
        corrupt(np.zeros((1, 1, 4, 4), np.float32), "blur", 0)
    assert parse_families(None) == list(CORRUPTIONS)


@pytest.fixture()
def scaled_bundle(tmp_path):
    """A hand-made max-softmax bundle whose input normalization maps raw [0, 1] onto the scores [-10, 10]."""
    root = handmade.write_bundle(tmp_path / "bundle", kind="max_softmax", threshold=0.7)
    manifest = json.loads((root / "manifest.json").read_text())
    width = handmade.Layout().width
    manifest["input"]["mean"], manifest["input"]["std"] = [0.5] * width, [1.0 / SCALE] * width
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_robust_calibration_raises_the_threshold_a_corruption_breaks(scaled_bundle):
    from edgeexit.runtime.calibrate import calibrate
    from edgeexit.runtime.cascade import CascadeRunner
    from edgeexit.runtime.policies import get_policy
    from edgeexit.runtime.robust import OutputSet, RobustSettings, RobustSimulator, corrupted_sets

    x, y = handmade.synthetic_scores(n=300, seed=4)
    x = np.clip(x, -9.5, 9.5)  # inside the raw range, so denormalizing loses nothing
    runner = CascadeRunner(scaled_bundle)
    plain = calibrate(runner, x, y, ("target_drop", 1.0))
    robust = calibrate(runner, x, y, ("target_drop", 1.0), robust=RobustSettings((CONFIDENT,)))

    # the plain thresholds lose more than the target on the corrupted inputs; the robust ones do not
    settings = RobustSettings((CONFIDENT,))
    shifted = corrupted_sets(runner, x, y, settings)
    outputs, final = runner.stage_outputs(x)

    def drops(record):
        policies = [get_policy("max_softmax")(t, {}, temp) for t, temp in zip(record["chosen"]["thresholds"], record["temperatures"])]
        sim = RobustSimulator(policies, [OutputSet("clean", outputs, final, y), *shifted], runner.manifest.exit_costs())
        return {name: e["drop_points"] for name, e in sim.report(record["chosen"]["thresholds"]).items()}

    assert drops(plain)[CONFIDENT] > 1.0
    assert drops(robust)[CONFIDENT] <= 1.0 + 1e-9 and drops(robust)["clean"] <= 1.0 + 1e-9
    assert robust["chosen"]["thresholds"][0] > plain["chosen"]["thresholds"][0]
    assert robust["robust"]["families"] == [CONFIDENT]
    assert robust["robust"]["sets"][CONFIDENT]["drop_points"] == pytest.approx(drops(robust)[CONFIDENT])
    assert robust["chosen"]["relative_macs"] >= plain["chosen"]["relative_macs"]
    assert robust["chosen"]["met"]

    # slack loosens the corrupted sets' target by that many points, and the clean target still holds
    slack = drops(plain)[CONFIDENT] / 2
    loose = calibrate(runner, x, y, ("target_drop", 1.0), robust=RobustSettings((CONFIDENT,), slack_points=slack))
    assert drops(loose)[CONFIDENT] <= 1.0 + slack + 1e-9 and drops(loose)["clean"] <= 1.0 + 1e-9
    assert drops(loose)[CONFIDENT] > drops(robust)[CONFIDENT]
    assert plain["chosen"]["relative_macs"] <= loose["chosen"]["relative_macs"] <= robust["chosen"]["relative_macs"]
    assert loose["chosen"]["thresholds"][0] < robust["chosen"]["thresholds"][0]
    assert loose["robust"]["slack_points"] == slack
    with pytest.raises(ConfigError, match="--shift-slack is in accuracy points"):
        RobustSettings((CONFIDENT,), slack_points=-1.0)


def test_calibrate_robust_and_run_guard_on_the_command_line(scaled_bundle, tmp_path):
    from click.testing import CliRunner

    from edgeexit import cli

    def invoke(*args):
        return CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)

    x, y = handmade.synthetic_scores(n=300, seed=4)
    raw = np.clip(x / SCALE + 0.5, 0.0, 1.0).astype(np.float32)  # what the bundle normalizes back to x
    data = tmp_path / "scores.npz"
    np.savez(data, x=raw, y=y)
    result = invoke("calibrate", scaled_bundle, "--data", f"npz:{data}", "--split", "all", "--target-drop", "1",
                    "--robust", "--families", CONFIDENT)
    assert result.exit_code == 0, result.output
    assert CONFIDENT in result.output and "drop" in result.output
    calibration = json.loads((scaled_bundle / "manifest.json").read_text())["calibration"]
    assert calibration["robust"]["families"] == [CONFIDENT]
    assert calibration["robust"]["sets"][CONFIDENT]["drop_points"] <= 1.0 + 1e-9
    assert len(calibration["drift_reference"]["exit_shares"]) == 3

    report_path = tmp_path / "run.json"
    result = invoke("run", scaled_bundle, "--data", f"npz:{data}", "--split", "all", "--batch-size", "50",
                    "--guard", "warn", "--guard-window", "100", "--json", report_path)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["guard"]["windows_checked"] == 3 and report["guard"]["windows_out_of_range"] == 0  # the calibration data
    assert report["drift"]["out_of_range"] == [] and report["drift"]["reference"] == "calibration"

    result = CliRunner().invoke(cli.main, ["calibrate", str(scaled_bundle), "--target-drop", "1", "--robust", "--families", "fog"])
    assert result.exit_code != 0 and "unknown corruption family 'fog'; choose from:" in result.output
    result = CliRunner().invoke(cli.main, ["calibrate", str(scaled_bundle), "--target-drop", "1", "--shift-slack", "1"])
    assert result.exit_code != 0 and "--shift-slack loosens the target of --robust's corrupted sets: add --robust" in result.output
