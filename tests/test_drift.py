"""The drift guard on hand-made bundles: the calibration's reference, warnings and fallback on a stream whose exit-0
rate jumps, and bundles without a reference."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

import handmade
from edgeexit.errors import ConfigError

WINDOW = 64


def confident_everywhere(x: np.ndarray) -> np.ndarray:
    """Packed rows whose exit-0 logits are one-hot and high (+9) on the final stage's class: everything leaves at exit 0."""
    layout = handmade.Layout()
    rows = x.reshape(len(x), -1).copy()
    final = rows[:, layout.columns(layout.exits, "logits")].argmax(axis=1)
    cols = layout.columns(0, "logits")
    rows[:, cols] = 0.0
    rows[np.arange(len(rows)), cols.start + final] = 9.0
    return rows.reshape(x.shape)


@pytest.fixture()
def calibrated(tmp_path):
    """A hand-made max-softmax bundle calibrated (target drop 2 points) on synthetic scores."""
    from edgeexit.runtime.bundle import save_calibration
    from edgeexit.runtime.calibrate import calibrate
    from edgeexit.runtime.cascade import CascadeRunner

    root = handmade.write_bundle(tmp_path / "bundle", kind="max_softmax", threshold=0.7)
    x, y = handmade.synthetic_scores(n=400, seed=5)
    record = calibrate(CascadeRunner(root), x, y, ("target_drop", 2.0))
    save_calibration(root, record)
    return root, record


def stream(n_clean: int, n_jump: int, n_back: int, seed: int = 6) -> np.ndarray:
    x, _ = handmade.synthetic_scores(n=n_clean + n_jump + n_back, seed=seed)
    x[n_clean : n_clean + n_jump] = confident_everywhere(x[n_clean : n_clean + n_jump])
    return x


def test_calibration_records_the_reference_it_chose(calibrated):
    from edgeexit.runtime.cascade import CascadeRunner
    from edgeexit.runtime.drift import DriftReference, manifest_reference

    root, record = calibrated
    reference = DriftReference.from_dict(record["drift_reference"], 2)
    counts = np.asarray(record["chosen"]["exit_counts"])
    np.testing.assert_allclose(reference.exit_shares, counts / counts.sum())
    assert reference.samples == counts.sum()
    for q in reference.score_quantiles:  # max-softmax scores of the inputs reaching each exit, rising
        assert q is not None and all(0 <= a <= b <= 1 for a, b in zip(q, q[1:]))
    loaded, why = manifest_reference(CascadeRunner(root))
    assert why == "" and loaded == reference


def test_guard_warns_when_the_exit0_rate_jumps(calibrated):
    from edgeexit.runtime.cascade import CascadeRunner
    from edgeexit.runtime.drift import DriftGuard, GuardSettings

    root, _ = calibrated
    runner = CascadeRunner(root)
    lines: list[str] = []
    guard = DriftGuard(runner, GuardSettings("warn", window=WINDOW), say=lines.append)
    x = stream(2 * WINDOW, 2 * WINDOW, 0)
    results = [guard.predict(x[i : i + 16]) for i in range(0, len(x), 16)]
    plain = runner.predict(x)
    np.testing.assert_array_equal(np.concatenate([r.predictions for r in results]), plain.predictions)  # warn changes nothing
    report = guard.report()
    assert report["windows_checked"] == 4 and report["windows_out_of_range"] == 2
    assert len(lines) == 2 and all("stage 0" in line and "out of range" in line for line in lines)
    assert lines[0].startswith("drift guard: window 3:")
    assert report["last_window"]["observed_shares"][0] == 1.0
    # the stage chain also reports exit-0 score quantiles: the jump's 10% above calibration's 90%
    assert report["last_window"]["score_quantiles"]["0"][0] > report["last_window"]["reference_score_quantiles"]["0"][-1]


def test_guard_falls_back_toward_full_onnx_and_returns(calibrated):
    from edgeexit.runtime.cascade import CascadeRunner
    from edgeexit.runtime.drift import FALLBACK_STEPS, DriftGuard, GuardSettings

    root, _ = calibrated
    runner = CascadeRunner(root)
    calibrated_thresholds = list(runner.thresholds)
    lines: list[str] = []
    guard = DriftGuard(runner, GuardSettings("fallback", window=WINDOW, probe_every=1), say=lines.append)
    jump = 2 * WINDOW + FALLBACK_STEPS * WINDOW
    x = stream(2 * WINDOW, jump, 2 * WINDOW)
    levels, exits = [], []
    for i in range(0, len(x), 16):
        result = guard.predict(x[i : i + 16])
        levels.append(guard.level)
        exits.append(result.exit_index)
    assert max(levels) == FALLBACK_STEPS  # stepped all the way while out of range
    rising = levels[: levels.index(FALLBACK_STEPS) + 1]
    assert rising == sorted(rising) and len(set(rising)) == FALLBACK_STEPS + 1  # one step per window out of range
    at_full = [e for e, before, after in zip(exits[1:], levels, levels[1:]) if before == after == FALLBACK_STEPS]
    assert at_full and all((e == runner.num_exits).all() for e in at_full)  # full.onnx decided those calls
    full = runner.predict_full(x[:16]).argmax(axis=1)
    guard.level = FALLBACK_STEPS
    np.testing.assert_array_equal(guard.predict(x[:16]).predictions, full)
    assert levels[-1] == 0 and any("restored" in line for line in lines)
    assert any("fallback step 1/3: thresholds" in line for line in lines)
    assert any("full.onnx decides every input" in line for line in lines)
    assert runner.thresholds == calibrated_thresholds
    raised = guard.fallback_thresholds(1)
    assert all(r > t for r, t in zip(raised, calibrated_thresholds))  # max-softmax: higher keeps more inputs


def test_fallback_with_probes_still_steps_once_per_window_of_the_stream(calibrated):
    """Only every 4th call feeds the window during fallback; the guard still moves one step per WINDOW inputs."""
    from edgeexit.runtime.cascade import CascadeRunner
    from edgeexit.runtime.drift import FALLBACK_STEPS, DriftGuard, GuardSettings

    root, _ = calibrated
    guard = DriftGuard(CascadeRunner(root), GuardSettings("fallback", window=WINDOW, probe_every=4), say=lambda line: None)
    x = stream(2 * WINDOW, 2 * WINDOW + FALLBACK_STEPS * WINDOW + 16, 0)
    steps = []  # stream position of each level change
    for i in range(0, len(x), 16):
        before = guard.level
        guard.predict(x[i : i + 16])
        if guard.level != before:
            steps.append((i + 16, guard.level))
    assert [level for _, level in steps] == list(range(1, FALLBACK_STEPS + 1))
    assert all(b - a <= WINDOW for (a, _), (b, _) in zip(steps, steps[1:]))


def test_no_reference_is_one_line_and_changes_nothing(tmp_path):
    from edgeexit.runtime.cascade import CascadeRunner
    from edgeexit.runtime.drift import DriftGuard, GuardSettings

    root = handmade.write_bundle(tmp_path / "bundle", kind="max_softmax", threshold=0.7)
    runner = CascadeRunner(root)
    lines: list[str] = []
    guard = DriftGuard(runner, GuardSettings("fallback", window=8), say=lines.append)
    x = stream(0, 64, 0)
    np.testing.assert_array_equal(guard.predict(x).exit_index, runner.predict(x).exit_index)
    assert len(lines) == 1 and lines[0].startswith("drift guard: no drift reference")
    assert guard.report()["windows_checked"] == 0


def test_other_thresholds_have_no_reference(calibrated, tmp_path):
    from edgeexit.runtime.cascade import CascadeRunner
    from edgeexit.runtime.drift import manifest_reference

    root, _ = calibrated
    reference, why = manifest_reference(CascadeRunner(shutil.copytree(root, tmp_path / "copy"), thresholds=0.99))
    assert reference is None and "no drift reference for these thresholds" in why


def test_guard_settings_refuse_bad_values():
    from edgeexit.runtime.drift import GuardSettings

    with pytest.raises(ConfigError, match="unknown guard mode 'loud'; choose from: off, warn, fallback"):
        GuardSettings("loud")
    with pytest.raises(ConfigError, match="window"):
        GuardSettings("warn", window=0)
