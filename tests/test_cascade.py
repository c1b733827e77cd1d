"""The cascade's decisions on bundles where every stage takes a share of the inputs, for every policy:
the exit mix, survivor compaction, batch vs one-by-one, an independent numpy reference,
monotonicity, per-exit and CLI overrides; plus input and device errors on a trained bundle."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import json

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import handmade
from edgeexit.cli import main
from edgeexit.runtime import CascadeRunner, ConfigError, DeviceError, InputError
from edgeexit.runtime.manifest import read_manifest
from edgeexit.runtime.bundle import save_manifest

KINDS = sorted(handmade.POLICY_DEFAULTS)
# A score closer than this to its cut may fall either side between float32 graphs and the float64 reference,
# or between batch sizes; such inputs are left out of equality checks (and must stay rare).
TIE_MARGIN = 1e-4
MIN_CLEAR = 0.95
# per policy: (T for both exits, another T for exit 1 only) where both exits take inputs
OVERRIDES = {"confidence": (0.5, 0.8), "max_softmax": (0.7, 0.9), "entropy": (0.6, 0.2), "exclusion": (0.0, 0.4)}


@pytest.fixture(scope="module")
def scores():
    """Packed inputs of known scores and their labels (seeded)."""
    return handmade.synthetic_scores()


def runner_for(bundles, kind, **kwargs) -> CascadeRunner:
    return CascadeRunner(bundles[kind], threads=1, **kwargs)


def reference(kind: str, thresholds, args: dict, x: np.ndarray):
    """The cascade written out per input from the known scores in x (see handmade.reference_cascade)."""
    return handmade.reference_cascade(kind, thresholds, args, *handmade.unpack(handmade.Layout(), x))


def clear_of_ties(margin: np.ndarray) -> np.ndarray:
    clear = margin > TIE_MARGIN
    assert clear.mean() >= MIN_CLEAR, f"only {clear.mean():.0%} of inputs are clear of ties: the test data is degenerate"
    return clear


@pytest.mark.parametrize("kind", KINDS)
def test_every_stage_takes_a_share(handmade_bundles, scores, kind):
    """The precondition of every check below: no stage is skipped or starved at the default thresholds."""
    x, _ = scores
    counts = runner_for(handmade_bundles, kind).predict(x).exit_counts()
    assert len(counts) == handmade.EXITS + 1
    assert min(counts) >= 0.1 * len(x), f"{kind}: exit mix {counts}"


@pytest.mark.parametrize("kind", KINDS)
def test_decisions_equal_the_numpy_reference(handmade_bundles, scores, kind):
    x, _ = scores
    default, args = handmade.POLICY_DEFAULTS[kind]
    runner = runner_for(handmade_bundles, kind)
    for thresholds in ([default] * handmade.EXITS, *sweep(kind)[1:-1:3].reshape(-1, 1).repeat(handmade.EXITS, 1)):
        runner.set_thresholds(list(thresholds))
        result = runner.predict(x)
        predictions, exit_index, margin = reference(kind, list(thresholds), args, x)
        clear = clear_of_ties(margin)
        np.testing.assert_array_equal(result.exit_index[clear], exit_index[clear])
        np.testing.assert_array_equal(result.predictions[clear], predictions[clear])


@pytest.mark.parametrize("kind", KINDS)
def test_survivors_are_compacted_and_batch_equals_one_by_one(handmade_bundles, scores, kind):
    x, _ = scores
    runner = runner_for(handmade_bundles, kind)
    sizes: list[tuple[int, int]] = []
    run_stage = runner.run_stage
    runner.run_stage = lambda index, features: sizes.append((index, len(features))) or run_stage(index, features)
    batched = runner.predict(x)
    counts = batched.exit_counts()
    # stage k runs on exactly the inputs no earlier exit took, once
    assert sizes == [(k, len(x) - sum(counts[:k])) for k in range(len(counts))]
    sizes.clear()
    single = [runner.predict(x[i : i + 1]) for i in range(len(x))]
    _, _, margin = reference(kind, runner.thresholds, runner.policies[0].args, x)
    clear = clear_of_ties(margin)
    np.testing.assert_array_equal(batched.exit_index[clear], np.array([r.exit_index[0] for r in single])[clear])
    np.testing.assert_array_equal(batched.predictions[clear], np.array([r.predictions[0] for r in single])[clear])


@pytest.mark.parametrize("kind", KINDS)
def test_chunks_and_shuffles_do_not_change_decisions(handmade_bundles, scores, kind):
    x, _ = scores
    whole = runner_for(handmade_bundles, kind).predict(x)
    chunked = runner_for(handmade_bundles, kind, chunk_size=7).predict(x)
    order = np.random.default_rng(1).permutation(len(x))
    shuffled = runner_for(handmade_bundles, kind).predict(np.ascontiguousarray(x[order]))
    np.testing.assert_array_equal(chunked.exit_index, whole.exit_index)
    np.testing.assert_array_equal(shuffled.exit_index, whole.exit_index[order])
    np.testing.assert_array_equal(shuffled.predictions, whole.predictions[order])


def sweep(kind: str) -> np.ndarray:
    """Shared thresholds from the loosest to the strictest setting of a policy."""
    if kind == "entropy":
        return np.linspace(np.log(handmade.CLASSES) + 0.01, 0.0, 13)  # exits when entropy <= T
    return np.linspace(0.0, 1.0, 13)


@pytest.mark.parametrize("kind", KINDS)
def test_a_stricter_threshold_never_exits_more(handmade_bundles, scores, kind):
    """Confidence-like policies: a higher T never exits more; entropy: a lower T; exclusion: T is a floor
    below which classes are dropped, so a higher T exits more, never fewer."""
    x, _ = scores
    runner = runner_for(handmade_bundles, kind)
    early, exit_indices = [], []
    for threshold in sweep(kind):
        runner.set_thresholds(float(threshold))
        result = runner.predict(x)
        early.append(int((result.exit_index < runner.num_exits).sum()))
        exit_indices.append(result.exit_index)
    if kind == "exclusion":
        assert early == sorted(early) and early[0] < early[-1] == len(x), early
        return
    assert early == sorted(early, reverse=True), early
    assert early[0] == len(x) and early[-1] < len(x) / 4, early
    assert len(set(early)) >= 5, f"the sweep barely moves: {early}"
    # per input too: a stricter shared threshold can only move an input's exit later
    for looser, stricter in zip(exit_indices, exit_indices[1:]):
        assert (stricter >= looser).all()


@pytest.mark.parametrize("beta", [0.3, 0.5, 0.7, 0.9])
def test_exclusion_beta_is_the_knob_that_exits_more(handmade_bundles, scores, beta):
    x, _ = scores
    tighter = runner_for(handmade_bundles, "exclusion", policy_args={"beta": beta}).predict(x)
    looser = runner_for(handmade_bundles, "exclusion", policy_args={"beta": beta - 0.2}).predict(x)
    assert (tighter.exit_index < 2).sum() >= (looser.exit_index < 2).sum()
    assert (tighter.exit_index != looser.exit_index).any()


@pytest.mark.parametrize("kind", KINDS)
def test_per_exit_override_changes_only_later_decisions(handmade_bundles, scores, kind):
    x, _ = scores
    low, high = OVERRIDES[kind]
    runner = runner_for(handmade_bundles, kind)
    runner.set_thresholds([low, low])
    before = runner.predict(x)
    runner.set_thresholds([low, high])
    after = runner.predict(x)
    assert runner.thresholds == [pytest.approx(low), pytest.approx(high)]
    # exit 0 sees the same threshold: the same inputs leave there with the same predictions
    np.testing.assert_array_equal(after.exit_index == 0, before.exit_index == 0)
    np.testing.assert_array_equal(after.predictions[after.exit_index == 0], before.predictions[before.exit_index == 0])
    assert after.exit_counts()[1] != before.exit_counts()[1], "the override of exit 1 moved nothing"
    with pytest.raises(ConfigError, match="got 3 thresholds for 2 exits"):
        runner.set_thresholds([low, low, low])


@pytest.mark.parametrize("kind", KINDS)
def test_cli_threshold_and_beta_overrides_reach_the_cascade(handmade_bundles, scores, kind, tmp_path):
    x, _ = scores
    np.save(tmp_path / "x.npy", x)
    low, high = OVERRIDES[kind]
    args = ["run", str(handmade_bundles[kind]), "--input", str(tmp_path / "x.npy"), "--threads", "1",
            "--threshold", f"{low!r},{high!r}", "--json", str(tmp_path / "r.json")]
    policy_args = None
    if kind == "exclusion":
        args += ["--beta", "0.8"]
        policy_args = {"beta": 0.8}
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    expected = runner_for(handmade_bundles, kind, thresholds=[low, high], policy_args=policy_args).predict(x)
    default = runner_for(handmade_bundles, kind).predict(x)
    assert report["thresholds"] == pytest.approx([low, high])
    assert report["exit_index"] == expected.exit_index.tolist() and report["predictions"] == expected.predictions.tolist()
    assert report["exit_counts"] != default.exit_counts(), "the override changed nothing: the test proves nothing"


def test_no_exit_path_reproduces_full_onnx(tiny_bundle, digits_test):
    runner = CascadeRunner(tiny_bundle, threads=1)
    x, _ = digits_test
    result = runner.predict(x, use_exits=False)
    np.testing.assert_array_equal(result.predictions, runner.predict_full(x).argmax(1))
    assert set(result.exit_index) == {runner.num_exits}


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((2, 1, 16), np.float32), "rank"),
        (np.zeros((2, 3, 16, 16), np.float32), "shape"),
        (np.zeros((2, 1, 16, 16), np.float64), "dtype"),
        (np.full((2, 1, 16, 16), np.nan, np.float32), "NaN"),
        (np.zeros((0, 1, 16, 16), np.float32), "empty"),
    ],
)
def test_bad_batches_get_input_errors(tiny_bundle, bad, message):
    with pytest.raises(InputError, match=message):
        CascadeRunner(tiny_bundle, threads=1).predict(bad)


def test_unknown_and_unavailable_devices(tiny_bundle, monkeypatch):
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        CascadeRunner(tiny_bundle, device="tpu")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(DeviceError, match="needs CUDAExecutionProvider.*available providers: CPUExecutionProvider$"):
        CascadeRunner(tiny_bundle, device="cuda")


def test_per_call_thresholds_let_threads_share_a_runner(bundle_copy, digits_test):
    data = read_manifest(bundle_copy)
    for stage in data["stages"][:-1]:  # the tiny model's confidence saturates at 1.0; softmax spreads
        stage["exit"]["policy"] = {"kind": "max_softmax", "threshold": 0.5, "args": {}}
    save_manifest(bundle_copy, data)
    runner = CascadeRunner(bundle_copy, threads=1)
    x = digits_test[0]
    top = runner.policies[0].scores(runner.stage_outputs(x)[0][0])
    levels = (0.0, float(np.median(top)), 1.0)
    expected = {t: runner.predict(x, thresholds=t).exit_index for t in levels}
    assert len({tuple(e) for e in expected.values()}) == 3 and runner.thresholds == [0.5, 0.5]

    def check(threshold):
        return all(np.array_equal(runner.predict(x[i : i + 30], thresholds=threshold).exit_index, expected[threshold][i : i + 30])
                   for i in range(0, len(x), 30))

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(check, levels * 6))
    assert all(results) and runner.thresholds == [0.5, 0.5]
    with pytest.raises(ConfigError, match="got 3 thresholds for 2 exits"):
        runner.predict(x, thresholds=[0.5] * 3)
