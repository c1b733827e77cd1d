"""`edgeexit bench` on the tiny bundle: valid JSON, consistent variants, real PNGs."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from edgeexit.cli import main
from edgeexit.runtime.bench import oracle
from edgeexit.runtime.bench_plots import PLOTS, write_plots
from edgeexit.errors import MissingExtraError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench_dir(tiny_bundle, tiny_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = CliRunner().invoke(main, [
        "bench", str(tiny_bundle), "--data", "digits", "--threads", "1", "--batch-size", "4", "--limit", "48",
        "--sweep-points", "3", "--model", str(tiny_model_path), "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    assert "speedup realized" in result.output
    return out


def test_bench_json_is_complete_and_consistent(bench_dir):
    report = json.loads((bench_dir / "bench.json").read_text())
    for key in ("accuracy", "relative_macs", "exit_counts", "latency_ms", "device", "providers", "threads", "batch_size"):
        assert key in report
    assert report["samples"] == 48 and report["batch_size"] == 4 and report["threads"] == 1
    for variant in ("full_onnx", "cascade", "cascade_no_exit", "pytorch_eager"):
        lat = report[variant]["latency_ms"]
        assert lat["calls"] == 12 and 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
    no_exit = report["cascade_no_exit"]
    assert no_exit["exit_counts"][:-1] == [0] * (len(no_exit["exit_counts"]) - 1)
    assert no_exit["relative_macs"] >= 1.0
    # the ONNX graphs and PyTorch eager compute the same backbone
    assert abs(report["pytorch_eager"]["accuracy"] - report["full_onnx"]["accuracy"]) <= 1 / 48
    assert report["oracle"]["accuracy"] >= report["full_onnx"]["accuracy"]
    assert report["oracle"]["relative_macs"] <= 1.0
    speed = report["speedup"]
    assert speed["macs_predicted"] == pytest.approx(1 / report["relative_macs"])
    assert len(report["sweep"]["measured"]) == 3 and report["sweep"]["simulated"]


def test_bench_writes_pngs(bench_dir):
    for name in PLOTS:
        assert (bench_dir / name).read_bytes()[:8] == PNG_MAGIC


def test_oracle_takes_first_correct_exit():
    labels = np.array([0, 1, 1])
    exit_outputs = [{"logits": np.array([[9.0, 0], [9, 0], [9, 0]])}, {"logits": np.array([[0, 9.0], [0, 9], [9, 0]])}]
    final = np.array([[9.0, 0], [0, 9], [0, 9]])
    result = oracle(exit_outputs, final, labels, [0.2, 0.5, 1.0])
    assert result["exit_counts"] == [1, 1, 1]
    assert result["relative_macs"] == pytest.approx((0.2 + 0.5 + 1.0) / 3)
    assert result["accuracy"] == 1.0


def test_plots_without_matplotlib_is_one_line_error(bench_dir, monkeypatch, tmp_path):
    report = json.loads((bench_dir / "bench.json").read_text())
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtraError, match="matplotlib"):
        write_plots(report, tmp_path)


def test_cli_bench_without_matplotlib_still_writes_json(tiny_bundle, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = CliRunner().invoke(main, ["bench", str(tiny_bundle), "--limit", "16", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "warning: no plots" in result.output and "Traceback" not in result.output
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert report["full_onnx"]["accuracy"] is not None and not list((tmp_path / "b").glob("*.png"))


def test_bench_times_the_engine_run_uses_and_both_engines(tiny_bundle, tmp_path):
    import shutil

    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    profiled = CliRunner().invoke(main, ["profile", str(bundle), "--threads", "1", "--repeats", "4"])
    assert profiled.exit_code == 0 and "/t1/b1/graph" in profiled.output  # auto at batch 1: the graph engine
    args = ["bench", str(bundle), "--threads", "1", "--batch-size", "1", "--limit", "16", "--sweep-points", "2"]
    result = CliRunner().invoke(main, [*args, "--engine", "both", "--out", str(tmp_path / "both")])
    assert result.exit_code == 0, result.output
    assert "cascade engine: graph" in result.stdout.splitlines()
    report = json.loads((tmp_path / "both" / "bench.json").read_text())
    assert report["engine"] == "graph" and report["predicted_latency_ms"] > 0  # the profile of the engine it timed
    assert report["cascade"]["expected_latency"]["profile"].endswith("/cpu/t1/b1/graph")
    assert report["cascade_chain"]["predicted_latency_ms"] is None  # no chain profile in the bundle
    assert report["cascade"]["exit_counts"] == report["cascade_chain"]["exit_counts"]  # the engines decide alike
    for name in ("cascade_no_exit", "cascade_chain_no_exit"):
        assert sum(report[name]["exit_counts"][:-1]) == 0 and report[name]["exit_counts"][-1] == 16
    assert {"no_exit_over_full", "chain_over_full", "chain_no_exit_over_full"} <= set(report["speedup"])
    result = CliRunner().invoke(main, [*args, "--engine", "chain", "--out", str(tmp_path / "chain")])
    assert result.exit_code == 0, result.output
    chain = json.loads((tmp_path / "chain" / "bench.json").read_text())
    assert chain["engine"] == "chain" and chain["predicted_latency_ms"] is None and "cascade_chain" not in chain


def _linear_classifier(path, input_shape, num_classes, seed=0, channels_in=None):
    """A hand-made static ONNX classifier: global average pool, then a fixed linear layer."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    c, h, w = input_shape
    c = channels_in or c
    weight = np.random.default_rng(seed).normal(size=(num_classes, c)).astype(np.float32)
    bias = np.linspace(-0.5, 0.5, num_classes, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], transB=1)],
        "baseline", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", c, h, w])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", num_classes])],
        initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return weight, bias


def test_bench_baseline_is_scored_and_timed_beside_the_cascade(tiny_bundle, tmp_path):
    from edgeexit.runtime.datasets import load_eval_data
    from edgeexit.runtime.manifest import load_manifest

    manifest = load_manifest(tiny_bundle)
    weight, bias = _linear_classifier(tmp_path / "small.onnx", manifest.input_shape, manifest.num_classes)
    out = tmp_path / "bench"
    result = CliRunner().invoke(main, ["bench", str(tiny_bundle), "--data", "digits", "--threads", "1", "--limit", "40",
                                       "--sweep-points", "2", "--baseline", str(tmp_path / "small.onnx"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "baseline:small" in result.output
    report = json.loads((out / "bench.json").read_text())
    x, labels = load_eval_data("digits", "test", manifest.input_spec)
    expected = (x[:40].mean(axis=(2, 3)) @ weight.T + bias).argmax(1)
    entry = report["baseline:small"]
    assert entry["accuracy"] == pytest.approx(float((expected == labels[:40]).mean()))
    assert entry["relative_macs"] is None and entry["latency_ms"]["calls"] == 40
    assert report["speedup"]["baseline:small_over_full_onnx"] > 0


def test_bench_baseline_that_does_not_fit_the_bundle_is_one_line(tiny_bundle, tmp_path):
    from edgeexit.runtime.manifest import load_manifest

    manifest = load_manifest(tiny_bundle)
    c, h, w = manifest.input_shape
    _linear_classifier(tmp_path / "rgb.onnx", manifest.input_shape, manifest.num_classes, channels_in=c + 2)
    _linear_classifier(tmp_path / "classes.onnx", manifest.input_shape, manifest.num_classes + 1)
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    for name, message in (("rgb.onnx", "must take one float input shaped"), ("classes.onnx", "logits per input"),
                          ("junk.onnx", "cannot load baseline"), ("missing.onnx", "baseline model not found")):
        result = CliRunner().invoke(main, ["bench", str(tiny_bundle), "--data", "digits", "--limit", "8",
                                           "--baseline", str(tmp_path / name), "--out", str(tmp_path / "b")])
        assert result.exit_code != 0 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
