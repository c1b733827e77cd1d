"""The cascade's decisions, survivor compaction and parity with the exported graphs."""
import numpy as np
import onnxruntime as ort
import pytest

from edgeexit.runtime import CascadeRunner, DeviceError, InputError


@pytest.fixture(scope="module")
def runner(tiny_bundle):
    return CascadeRunner(tiny_bundle, device="cpu", threads=1)


def reference_cascade(runner, x, threshold):
    """A plain numpy re-implementation: run every stage on every input, then pick the first exit."""
    sessions = [ort.InferenceSession(str(runner.manifest.path(s["file"])), providers=["CPUExecutionProvider"])
                for s in runner.manifest.stages]
    outputs, h = [], x
    for session in sessions:
        result = session.run(None, {session.get_inputs()[0].name: h})
        outputs.append(result)
        h = result[0]
    predictions = outputs[-1][0].argmax(1)
    exit_index = np.full(len(x), len(sessions) - 1)
    decided = np.zeros(len(x), dtype=bool)
    cutoff = np.log(threshold) - np.log1p(-threshold)  # sigmoid(z) >= T, decided in float64 logit space
    for k, (_, logits, confidence_logit) in enumerate(outputs[:-1]):
        take = ~decided & (confidence_logit[:, 0].astype(np.float64) >= cutoff)
        predictions = np.where(take, logits.argmax(1), predictions)
        exit_index = np.where(take, k, exit_index)
        decided |= take
    return predictions, exit_index


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.8, 0.95])
def test_decisions_equal_numpy_reference(runner, digits_test, threshold):
    x, _ = digits_test
    runner.set_thresholds(threshold)
    result = runner.predict(x)
    predictions, exit_index = reference_cascade(runner, x, threshold)
    np.testing.assert_array_equal(result.predictions, predictions)
    np.testing.assert_array_equal(result.exit_index, exit_index)


def test_batch_compaction_matches_batch_size_one(runner, digits_test):
    x, _ = digits_test
    runner.set_thresholds(0.5)
    batched = runner.predict(x[:96])
    single = [runner.predict(x[i : i + 1]) for i in range(96)]
    np.testing.assert_array_equal(batched.predictions, [r.predictions[0] for r in single])
    np.testing.assert_array_equal(batched.exit_index, [r.exit_index[0] for r in single])


def test_trained_exits_take_a_real_share_early(runner, digits_test):
    x, y = digits_test
    runner.set_thresholds(runner.manifest.exits[0]["policy"]["threshold"])
    result = runner.predict(x)
    early = (result.exit_index < runner.num_exits).mean()
    assert early >= 0.3, f"only {early:.0%} of digits left early"
    assert (result.predictions == y).mean() >= 0.8
    assert runner.relative_macs(result) < 0.9


def test_no_exit_path_reproduces_full_onnx(runner, digits_test):
    x, _ = digits_test
    result = runner.predict(x, use_exits=False)
    np.testing.assert_array_equal(result.predictions, runner.predict_full(x).argmax(1))
    assert set(result.exit_index) == {runner.num_exits}


def test_higher_threshold_never_exits_more(runner, digits_test):
    x, _ = digits_test
    early = []
    for t in (0.0, 0.5, 0.9, 1.0):
        runner.set_thresholds(t)
        early.append(int((runner.predict(x).exit_index < runner.num_exits).sum()))
    early.append(int((runner.predict(x, use_exits=False).exit_index < runner.num_exits).sum()))
    assert early == sorted(early, reverse=True) and early[0] == len(x) and early[-1] == 0


def test_chunked_huge_batch_matches_unchunked(tiny_bundle, digits_test):
    x, _ = digits_test
    small = CascadeRunner(tiny_bundle, chunk_size=7).predict(x)
    whole = CascadeRunner(tiny_bundle, chunk_size=10_000).predict(x)
    np.testing.assert_array_equal(small.predictions, whole.predictions)


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
def test_bad_batches_get_input_errors(runner, bad, message):
    with pytest.raises(InputError, match=message):
        runner.predict(bad)


def test_unknown_and_unavailable_devices(tiny_bundle):
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        CascadeRunner(tiny_bundle, device="tpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(DeviceError, match="available providers: .*CPUExecutionProvider"):
            CascadeRunner(tiny_bundle, device="cuda")
