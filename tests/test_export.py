"""Exported stages match PyTorch and chain to full.onnx; verification (export's and `edgeexit verify`'s)
catches a real weight change just beyond the stated tolerance and lets one just within it pass."""
import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from edgeexit.cli import main
from edgeexit.export import export_bundle
from edgeexit.export.verify import torch_stage_outputs, verification_inputs
from edgeexit.runtime.verify import TOLERANCE, max_abs_diff
from edgeexit.runtime import VerificationError
from edgeexit.runtime.manifest import MANIFEST_NAME
from edgeexit.runtime.files import sha256_file
from edgeexit.train.models import load_model
from edgeexit.runtime import CascadeRunner, load_manifest


def test_every_stage_matches_pytorch(tiny_bundle, tiny_model_path, digits_test):
    model = load_model(tiny_model_path)
    runner = CascadeRunner(tiny_bundle)
    x = digits_test[0][:32]
    expected = torch_stage_outputs(model, x)
    for index, reference in enumerate(expected):
        stage_input = x if index == 0 else expected[index - 1][0]
        got = runner.run_stage(index, stage_input)
        assert len(got) == len(reference)
        for a, b in zip(got, reference):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_chained_stages_reproduce_full_onnx(tiny_bundle, digits_test):
    runner = CascadeRunner(tiny_bundle)
    x = digits_test[0][:32]
    _, chained = runner.stage_outputs(x)
    np.testing.assert_allclose(chained, runner.predict_full(x), atol=1e-4)


def test_stage_graphs_fuse_segment_and_head_with_symbolic_batch(tiny_bundle):
    manifest = load_manifest(tiny_bundle)
    for stage in manifest.stages:
        graph = onnx.load(str(tiny_bundle / stage.file))
        assert len(graph.graph.input) == 1
        for value in [*graph.graph.input, *graph.graph.output]:
            assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
        names = [o.name for o in graph.graph.output]
        assert names == stage.output_names
    first = manifest.stages[0]
    assert first.output_names == ["features_0", "exit_0_logits", "exit_0_confidence_logit"]
    assert manifest.stages[1].inputs[0].name == "features_0"


def test_manifest_records_costs_hashes_and_producer(tiny_bundle):
    data = json.loads((tiny_bundle / "manifest.json").read_text())
    assert data["producer"]["torch"] == torch.__version__
    assert data["input"]["shape"][0] == "batch" and len(data["input"]["mean"]) == 1
    cumulative = [s["macs"]["cumulative"] for s in data["stages"]]
    assert cumulative == sorted(cumulative) and cumulative[-1] > data["full"]["macs"] * 0.99
    assert all(len(s["sha256"]) == 64 for s in data["stages"])
    assert data["stages"][0]["exit"]["policy"] == {"kind": "confidence", "threshold": 0.5, "args": {}}




def shift_final_bias(path, delta: float) -> None:
    """A real, small change of one weight: add `delta` to the first bias value of the layer that
    computes the graph's first output (the final classifier), and save the graph."""
    model = onnx.load(path)
    node = next(n for n in model.graph.node if model.graph.output[0].name in n.output)
    initializers = {i.name: i for i in model.graph.initializer}
    bias = initializers[next(name for name in reversed(node.input) if name in initializers)]
    values = numpy_helper.to_array(bias).copy()
    values.flat[0] += delta
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.save(model, path)


def logit_scales(model_path) -> dict[str, float]:
    """Per verification input kind, the magnitude the tolerance is scaled by: max(1, largest |logit|)."""
    model = load_model(model_path)
    with torch.no_grad():
        return {kind: max(1.0, float(model.backbone.eval()(torch.from_numpy(x)).abs().max()))
                for kind, x in verification_inputs(model).items()}


def perturbed_export(monkeypatch, delta: float) -> None:
    """Make the exporter's graph writer shift the final stage's classifier bias by `delta` after writing it."""
    from edgeexit.export import exporter

    real = exporter.export_graph

    def export_graph(module, example, path, *args, **kwargs):
        graph = real(module, example, path, *args, **kwargs)
        if path.name == "stage_2.onnx":
            shift_final_bias(path, delta)
        return graph

    monkeypatch.setattr(exporter, "export_graph", export_graph)


def snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_tolerance_is_absolute_up_to_one_and_relative_above():
    """The rule the README states: |a - b| <= 1e-4, or 1e-4 of the largest |b| when that exceeds 1."""
    assert TOLERANCE == 1e-4
    small = np.linspace(-0.5, 0.5, 11, dtype=np.float32)
    assert max_abs_diff(small + 2e-4, small) > TOLERANCE
    assert max_abs_diff(small + 5e-5, small) <= TOLERANCE
    large = np.linspace(-100, 100, 11, dtype=np.float32)
    assert max_abs_diff(large + 5e-3, large) <= TOLERANCE  # 5e-5 of 100
    assert max_abs_diff(large + 2e-2, large) > TOLERANCE  # 2e-4 of 100


def test_export_fails_on_a_weight_changed_slightly_beyond_tolerance(tiny_model_path, bundle_copy, monkeypatch):
    """No stand-in verifier: the real one must catch one bias value moved 1.5x the tolerance, exit 7,
    and leave the earlier bundle as it was."""
    before = snapshot(bundle_copy)
    perturbed_export(monkeypatch, 1.5 * TOLERANCE * max(logit_scales(tiny_model_path).values()))
    result = CliRunner().invoke(main, ["export", str(tiny_model_path), str(bundle_copy)])
    assert result.exit_code == VerificationError.exit_code, result.output
    assert result.stderr.strip().splitlines()[-1].startswith("error: stage_2.onnx output 'logits' differs from PyTorch")
    assert snapshot(bundle_copy) == before
    assert [p.name for p in bundle_copy.parent.iterdir() if p.name.startswith(".bundle.")] == []


def test_export_accepts_a_change_within_tolerance_and_reports_it(tiny_model_path, tmp_path, monkeypatch):
    scales = logit_scales(tiny_model_path)
    delta = 0.5 * TOLERANCE  # scales are >= 1: within tolerance on every input kind
    perturbed_export(monkeypatch, delta)
    manifest = export_bundle(tiny_model_path, tmp_path / "bundle")
    measured = manifest.verification["random"]["logits"]
    assert measured == pytest.approx(delta / scales["random"], rel=0.05)  # the change was there, and measured


def verify_inputs_scale(bundle) -> float:
    """max(1, |logit|) of full.onnx on the random inputs `edgeexit verify` draws (seed 0, 8 samples)."""
    runner = CascadeRunner(bundle)
    x = np.random.default_rng(0).standard_normal((8, *runner.manifest.input_shape)).astype(np.float32)
    return max(1.0, float(np.abs(runner.predict_full(x)).max()))


@pytest.mark.parametrize("factor, code", [(1.5, VerificationError.exit_code), (0.5, 0)])
def test_verify_catches_a_stage_changed_beyond_tolerance_with_a_fixed_hash(bundle_copy, factor, code):
    """A re-hashed stage whose classifier moved 1.5x the tolerance fails the chain check; 0.5x passes."""
    shift_final_bias(bundle_copy / "stage_2.onnx", factor * TOLERANCE * verify_inputs_scale(bundle_copy))
    manifest = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    manifest["stages"][2]["sha256"] = sha256_file(bundle_copy / "stage_2.onnx")
    (bundle_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["verify", str(bundle_copy)])
    assert result.exit_code == code, result.output
    assert "ok   sha256 stage_2.onnx" in result.output
    status = "FAIL" if code else "ok  "
    assert f"{status} chain vs full.onnx" in result.output


def run_onnx(model, x):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_rewrites_for_onnxruntime_keep_values_and_leave_other_ops_alone():
    """GlobalAveragePool for a spatial mean, W x^T for a wide one-row Gemm; a channel mean and a narrow Gemm stay."""
    from onnx import TensorProto, helper

    from edgeexit.export.onnx_graphs import BY_ROWS_MIN_INPUTS, one_output_gemms_by_rows, pool_globally

    rng = np.random.default_rng(0)
    wide, narrow = BY_ROWS_MIN_INPUTS, 8
    inits = [numpy_helper.from_array(v, n) for n, v in {
        "hw": np.array([2, 3], np.int64), "c": np.array([1], np.int64), "flat": np.array([2, -1], np.int64),
        "w_wide": rng.standard_normal((1, wide)).astype(np.float32), "w_narrow": rng.standard_normal((1, narrow)).astype(np.float32),
        "b": np.array([0.5], np.float32)}.items()]
    nodes = [
        helper.make_node("ReduceMean", ["x", "hw"], ["spatial"], keepdims=1),
        helper.make_node("ReduceMean", ["x", "c"], ["channels"], keepdims=1),
        helper.make_node("Reshape", ["x", "flat"], ["rows"]),
        helper.make_node("Gemm", ["rows", "w_wide", "b"], ["wide_out"], transB=1),
        helper.make_node("Reshape", ["spatial", "flat"], ["pooled"]),
        helper.make_node("Gemm", ["pooled", "w_narrow", "b"], ["narrow_out"], transB=1),
    ]
    shapes = {"spatial": [2, narrow, 1, 1], "channels": [2, 1, 8, 16], "wide_out": [2, 1], "narrow_out": [2, 1]}
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in shapes.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, narrow, 8, 16])], outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = rng.standard_normal((2, narrow, 8, 16)).astype(np.float32)
    before = run_onnx(model, x)

    assert pool_globally(model) == 1 and one_output_gemms_by_rows(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GlobalAveragePool") == 1 and ops.count("ReduceMean") == 1 and ops.count("Transpose") == 1
    assert "hw" not in {i.name for i in model.graph.initializer}  # the axes nobody reads any more
    onnx.checker.check_model(model, full_check=True)
    for a, b in zip(run_onnx(model, x), before):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_exported_graphs_carry_the_rewrites(tiny_bundle):
    manifest = load_manifest(tiny_bundle)
    graphs = {entry.file: onnx.load(str(tiny_bundle / entry.file)).graph for entry in (*manifest.stages, manifest.full)}
    for name, graph in graphs.items():
        ops = [n.op_type for n in graph.node]
        assert "ReduceMean" not in ops, name
    assert "GlobalAveragePool" in [n.op_type for n in graphs["full.onnx"].node]
    first = graphs[manifest.stages[0].file]
    producer = {out: node for node in first.node for out in node.output}
    confidence = producer["exit_0_confidence_logit"]  # plain head over a 16x16x16 map: wide enough to run by rows
    assert confidence.op_type == "Transpose" and producer[confidence.input[0]].op_type == "Gemm"


@pytest.mark.parametrize("draw, op", [(lambda x: x * (torch.rand_like(x) < 0.5), "RandomUniformLike"),
                                      (lambda x: torch.nn.functional.dropout(x, 0.2, training=True), "Dropout")])
def test_export_refuses_a_graph_that_draws_random_numbers(tmp_path, draw, op):
    """Train-mode code in an exported graph (dropout, stochastic depth) is refused by name, whatever the outputs' scale."""
    from edgeexit.export.onnx_graphs import SingleOutput, export_graph

    class Noisy(torch.nn.Module):
        def forward(self, x):
            return draw(x * 1e-6)

    with pytest.raises(VerificationError, match=rf"noisy.onnx draws random numbers \({op}\)"):
        export_graph(Noisy(), torch.zeros(2, 1, 4, 4), tmp_path / "noisy.onnx", "x", ["y"])
    assert not (tmp_path / "noisy.onnx").exists()
    dropout = SingleOutput(torch.nn.Dropout(0.5)).train()  # a dropout module is exported in eval mode: no draw
    export_graph(dropout, torch.zeros(2, 1, 4, 4), tmp_path / "dropout.onnx", "x", ["y"])
