"""`edgeexit quantize`: int8 QDQ bundles from the tiny bundle, chain-fed calibration, errors, atomic output."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgeexit import cli
from edgeexit.runtime.cascade import CascadeRunner
from edgeexit.runtime.datasets import load_eval_data
from edgeexit.errors import ConfigError, InputError
from edgeexit.runtime.manifest import load_manifest
from edgeexit.runtime.files import sha256_file
from edgeexit.runtime.verify import verify_bundle

quantize = pytest.importorskip("edgeexit.export.quantize", reason="quantize needs the onnx package")


def invoke(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def val(tiny_bundle):
    return load_eval_data("digits", "val", load_manifest(tiny_bundle).input_spec)


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory, tiny_bundle, val):
    out = tmp_path_factory.mktemp("int8") / "int8"
    quantize.quantize_bundle(tiny_bundle, out, *val, data={"name": "digits", "split": "val"})
    return out


def test_int8_manifest_names_its_parent_and_graphs_are_qdq_per_channel(int8_bundle, tiny_bundle):
    import onnx

    manifest = load_manifest(int8_bundle)
    assert manifest.precision == "int8" and load_manifest(tiny_bundle).precision == "fp32"
    parent = manifest.quantization["parent"]
    assert parent["manifest_sha256"] == sha256_file(tiny_bundle / "manifest.json") and parent["name"] == tiny_bundle.name
    for entry in manifest.files():
        graph = onnx.load(str(int8_bundle / entry.file)).graph
        ops = [node.op_type for node in graph.node]
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops, entry.file
        weights = {init.name: init for init in graph.initializer}
        per_channel = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights
                       and weights[n.input[0]].data_type == onnx.TensorProto.INT8 and len(weights[n.input[1]].dims) == 1
                       and weights[n.input[1]].dims[0] > 1]
        assert per_channel, f"{entry['file']} has no per-channel int8 weights"
    assert (int8_bundle / "full.onnx").stat().st_size < 0.5 * (tiny_bundle / "full.onnx").stat().st_size


def test_int8_thresholds_recalibrated_at_the_fp32_cost(int8_bundle, tiny_bundle, val):
    record = load_manifest(int8_bundle).calibration
    fp32 = CascadeRunner(tiny_bundle)
    assert record["objective"] == {"budget": pytest.approx(fp32.relative_macs(fp32.predict(val[0])))}
    assert record["data"] == {"name": "digits", "split": "val", "samples": len(val[1])}
    ranges = load_manifest(int8_bundle).quantization["data"]
    assert ranges["samples"] == len(val[1]) and ranges["range_samples"] == min(len(val[1]), quantize.RANGE_SAMPLES)
    int8 = CascadeRunner(int8_bundle)
    assert int8.thresholds == record["chosen"]["thresholds"]


def test_int8_accuracy_close_to_fp32_and_verify_passes(int8_bundle, tiny_bundle, digits_test):
    x, y = digits_test
    fp32, int8 = CascadeRunner(tiny_bundle), CascadeRunner(int8_bundle)
    assert abs((fp32.predict_full(x).argmax(1) == y).mean() - (int8.predict_full(x).argmax(1) == y).mean()) <= 0.02
    assert (int8.predict(x).predictions == y).mean() >= (fp32.predict(x).predictions == y).mean() - 0.02
    checks = verify_bundle(int8_bundle)
    assert not [c for c in checks if c.failed], [c.line() for c in checks]
    assert any(c.name == "cascade.onnx vs chain decisions" and c.status == "ok" for c in checks)
    assert any("int8 tolerance" in c.detail for c in checks)


def test_calibration_flows_through_the_fp32_chain(tiny_bundle, val, tmp_path, monkeypatch):
    seen = {}

    def fake_quantize(source, target, input_name, data):
        seen[Path(source).name] = (input_name, data)
        shutil.copyfile(source, target)

    monkeypatch.setattr(quantize, "quantize_graph", fake_quantize)
    quantize.quantize_bundle(tiny_bundle, tmp_path / "q", *val, objective=("target_drop", 1.0))
    fp32 = CascadeRunner(tiny_bundle)
    x = val[0]
    features_0 = fp32.run_stage(0, x)[0]
    features_1 = fp32.run_stage(1, features_0)[0]
    assert seen["stage_0.onnx"][0] == "input" and np.array_equal(seen["stage_0.onnx"][1], x)
    assert seen["full.onnx"][0] == "input" and np.array_equal(seen["full.onnx"][1], x)
    assert seen["stage_1.onnx"][0] == "features_0" and np.allclose(seen["stage_1.onnx"][1], features_0, atol=1e-6)
    assert seen["stage_2.onnx"][0] == "features_1" and np.allclose(seen["stage_2.onnx"][1], features_1, atol=1e-6)


def test_failed_quantization_leaves_nothing(tiny_bundle, val, tmp_path, monkeypatch):
    calls = []

    def fail_second(source, target, input_name, data):
        calls.append(source)
        if len(calls) == 2:
            raise RuntimeError("injected quantizer crash")
        shutil.copyfile(source, target)

    monkeypatch.setattr(quantize, "quantize_graph", fail_second)
    with pytest.raises(RuntimeError, match="injected"):
        quantize.quantize_bundle(tiny_bundle, tmp_path / "q", *val)
    assert list(tmp_path.iterdir()) == []


def test_bad_calibration_data_is_an_input_error(tiny_bundle, val, tmp_path):
    x, y = val
    with pytest.raises(InputError, match="sample shape"):
        quantize.quantize_bundle(tiny_bundle, tmp_path / "q", x[:, :, :8, :8].copy(), y)
    with pytest.raises(ConfigError, match="labels"):
        quantize.quantize_bundle(tiny_bundle, tmp_path / "q", x, y[:-1])
    assert list(tmp_path.iterdir()) == []


def test_cli_quantize_refuses_an_int8_bundle_in_one_line(int8_bundle, tmp_path):
    result = invoke("quantize", int8_bundle, tmp_path / "again")
    assert result.exit_code == ConfigError.exit_code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "already an int8 bundle" in lines[0] and "Traceback" not in result.output
    assert not (tmp_path / "again").exists()


def test_cli_bench_and_info_work_on_int8(int8_bundle, tmp_path):
    result = invoke("bench", int8_bundle, "--limit", "16", "--sweep-points", "2", "--out", tmp_path / "bench")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert report["cascade"]["accuracy"] is not None and report["full_onnx"]["latency_ms"]["p50"] > 0
    assert invoke("verify", int8_bundle).exit_code == 0
