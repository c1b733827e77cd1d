"""Exported stages match PyTorch, chain to full.onnx, and land atomically."""
import json

import numpy as np
import onnx
import pytest
import torch

from edgeexit.export import export_bundle
from edgeexit.export.verify import torch_stage_outputs
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


def test_failed_verification_keeps_previous_bundle(tiny_model_path, tmp_path, monkeypatch):
    out = tmp_path / "bundle"
    export_bundle(tiny_model_path, out, verify=False)
    before = (out / "manifest.json").read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr("edgeexit.export.exporter.verify_bundle_against_model", broken)
    with pytest.raises(RuntimeError, match="injected"):
        export_bundle(tiny_model_path, out)
    assert (out / "manifest.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
