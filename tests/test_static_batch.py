"""Static-batch bundles for mobile NPUs: onnxruntime's mobile checker, padded runs, NNAPI/CoreML devices."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgeexit import cli
from edgeexit.runtime.cascade import CascadeRunner
from edgeexit.errors import BundleError, ConfigError, DeviceError
from edgeexit.runtime.manifest import load_manifest, validate

static_batch = pytest.importorskip("edgeexit.export.static_batch", reason="static-batch needs the onnx package")


def invoke(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def b1_bundle(tmp_path_factory, tiny_bundle):
    out = tmp_path_factory.mktemp("b1") / "b1"
    static_batch.static_batch_bundle(tiny_bundle, out, 1)
    return out


def coverage(path):
    """(supported, total) nodes per EP family from onnxruntime's mobile usability checker, shapes as written."""
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo

    model = ModelProtoWithShapeInfo(path).model_with_shape_info
    infos = {
        "nnapi": uc.check_nnapi_partitions(model, require_fixed_input_sizes=True),
        "coreml_nn": uc.check_coreml_partitions(model, True, "coreml_supported_neuralnetwork_ops.md"),
        "coreml_mlprogram": uc.check_coreml_partitions(model, True, "coreml_supported_mlprogram_ops.md"),
    }
    return {name: (info.num_supported_nodes, info.num_nodes, info.num_partitions) for name, info in infos.items()}


def test_mobile_checker_gives_nnapi_and_coreml_every_node_once_the_batch_is_fixed(b1_bundle, tiny_bundle):
    manifest = load_manifest(b1_bundle)
    # cascade.onnx is left out: its If nodes and policy ops (NonZero, ScatterND, ...) are not NNAPI/CoreML ops
    for entry in (*manifest.stages, manifest.full):
        # the pooling is GlobalAveragePool (export rewrites ReduceMean, which CoreML's NeuralNetwork format lacks)
        for ep, (supported, total, partitions) in coverage(b1_bundle / entry.file).items():
            assert total > 0 and supported == total and partitions == 1, (entry.file, ep, supported, total)
        for ep, (supported, total, _) in coverage(tiny_bundle / entry.file).items():
            assert supported == 0, (entry.file, ep, "symbolic batch should block the EP")


def test_static_batch_1_gets_the_batch_1_cascade_graph(b1_bundle, tiny_bundle, digits_test):
    from edgeexit.runtime.graph import GraphRunner

    manifest = load_manifest(b1_bundle)
    assert manifest.cascade.inputs[0].shape[0] == 1 and manifest.cascade.outputs[2].shape == (1,)
    x = digits_test[0][:40]
    graph, chain = GraphRunner(b1_bundle).predict(x), CascadeRunner(tiny_bundle).predict(x)
    np.testing.assert_array_equal(graph.exit_index, chain.exit_index)
    np.testing.assert_array_equal(graph.predictions, chain.predictions)


def test_static_manifest_and_padded_runs_match_the_original(tiny_bundle, tmp_path, digits_test):
    out = tmp_path / "b2"
    static_batch.static_batch_bundle(tiny_bundle, out, 2)
    manifest = load_manifest(out)
    assert manifest.static_batch == 2 and manifest.input_spec.shape[0] == 2
    assert manifest.cascade is None and not (out / "cascade.onnx").exists()  # compaction needs a symbolic batch
    assert all(t.shape[0] == 2 for s in manifest.stages for t in (*s.inputs, *s.outputs))
    x = digits_test[0][:7]  # odd count: the last group of every stage run is padded
    original, fixed = CascadeRunner(tiny_bundle), CascadeRunner(out)
    for batch in (x[:1], x):
        a, b = original.predict(batch), fixed.predict(batch)
        assert np.array_equal(a.predictions, b.predictions) and np.array_equal(a.exit_index, b.exit_index)
    np.testing.assert_allclose(fixed.predict_full(x), original.predict_full(x), atol=1e-5)
    assert invoke("verify", out).exit_code == 0


def test_bad_static_batch_requests_fail_in_one_line(b1_bundle, tiny_bundle, tmp_path):
    for args, fragment in (((b1_bundle, tmp_path / "x", "--batch", "2"), "already has the static batch 1"),
                           ((tiny_bundle, tmp_path / "x", "--batch", "0"), "positive int")):
        result = invoke("static-batch", *args)
        assert result.exit_code == ConfigError.exit_code, result.output
        assert result.output.count("\n") == 1 and fragment in result.output
    assert not (tmp_path / "x").exists()


def test_manifest_batch_dims_must_match_static_batch(b1_bundle):
    data = json.loads((b1_bundle / "manifest.json").read_text())
    for broken, fragment in ((lambda d: d.update(static_batch=None), "symbolic 'batch'"),
                             (lambda d: d.update(static_batch=True), "positive int"),
                             (lambda d: d["stages"][-1]["outputs"][0]["shape"].__setitem__(0, 4), "static batch 1")):
        copy = json.loads(json.dumps(data))
        broken(copy)
        with pytest.raises(BundleError, match=fragment):
            validate(copy)


@pytest.mark.parametrize("device", ["nnapi", "coreml"])
def test_mobile_devices_map_to_their_providers_or_fail_in_one_line(b1_bundle, device):
    import onnxruntime as ort

    provider = {"nnapi": "NnapiExecutionProvider", "coreml": "CoreMLExecutionProvider"}[device]
    if provider in ort.get_available_providers():
        pytest.skip(f"{provider} is available here")
    result = invoke("run", b1_bundle, "--device", device, "--input", "missing.npy")
    assert result.exit_code == DeviceError.exit_code, result.output
    assert result.output.count("\n") == 1 and provider in result.output and "CPUExecutionProvider" in result.output


@pytest.mark.slow
def test_export_static_batch(tiny_model_path, tmp_path):
    result = invoke("export", tiny_model_path, tmp_path / "b", "--static-batch", "1")
    assert result.exit_code == 0, result.output
    assert load_manifest(tmp_path / "b").static_batch == 1 and [p.name for p in tmp_path.iterdir()] == ["b"]
