"""The batch-1 graph: export writes cascade_b1.onnx beside cascade.onnx, `run` uses it for one input per call,
calibrate keeps both in step, and bundles without it keep working."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgeexit.cli import main
from edgeexit.errors import BundleError
from edgeexit.runtime.cascade import CascadeRunner
from edgeexit.runtime.graph import GraphRunner, open_runner
from edgeexit.runtime.manifest import CASCADE_B1_NAME, CASCADE_NAME, load_manifest, read_manifest
from edgeexit.runtime.files import write_json_atomic


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_export_writes_the_batch_one_graph_with_its_record(tiny_bundle):
    manifest = load_manifest(tiny_bundle)
    graph = manifest.cascade_b1
    assert graph is not None and graph.file == CASCADE_B1_NAME and (tiny_bundle / CASCADE_B1_NAME).is_file()
    assert graph.inputs[0].shape[0] == 1 and manifest.cascade.inputs[0].shape[0] == "batch"
    assert [t.default for t in graph.inputs[1:]] == [t.default for t in manifest.cascade.inputs[1:]]
    assert CASCADE_B1_NAME in [entry.file for entry in manifest.files()]  # hashed and checked like every graph


@pytest.mark.parametrize("engine", ["auto", "graph"])
def test_batch_one_runs_the_batch_one_graph_and_decides_as_the_chain(tiny_bundle, digits_test, engine):
    x = digits_test[0][:40]
    one = open_runner(tiny_bundle, engine, batch_size=1, threads=1)
    many = open_runner(tiny_bundle, engine, batch_size=8, threads=1)
    assert one.graph.file == CASCADE_B1_NAME and many.graph.file == CASCADE_NAME
    want = CascadeRunner(tiny_bundle, threads=1).predict(x)
    for runner in (one, many):
        got = runner.predict(x)  # the batch-1 graph takes a larger batch one input at a time
        assert np.array_equal(got.predictions, want.predictions) and np.array_equal(got.exit_index, want.exit_index)
    thresholds = [0.1, 0.9]  # per-call thresholds reach the batch-1 graph too
    assert np.array_equal(one.predict(x, thresholds=thresholds).exit_index,
                          CascadeRunner(tiny_bundle, threads=1).predict(x, thresholds=thresholds).exit_index)


def test_bundle_without_the_batch_one_graph_runs_cascade_onnx_at_batch_one(bundle_copy, digits_test):
    data = read_manifest(bundle_copy)
    del data["cascade_b1"]
    write_json_atomic(bundle_copy / "manifest.json", data)
    (bundle_copy / CASCADE_B1_NAME).unlink()
    runner = open_runner(bundle_copy, "auto", batch_size=1)
    assert isinstance(runner, GraphRunner) and runner.graph.file == CASCADE_NAME
    assert cli("run", bundle_copy, "--batch-size", 1).exit_code == 0
    assert cli("verify", bundle_copy).exit_code == 0


def test_tampered_batch_one_graph_is_refused(bundle_copy):
    path = bundle_copy / CASCADE_B1_NAME
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(BundleError, match=CASCADE_B1_NAME):
        load_manifest(bundle_copy)


def test_calibrate_rewrites_both_graphs_and_run_follows(bundle_copy, tmp_path):
    assert cli("calibrate", bundle_copy, "--target-drop", 1).exit_code == 0
    manifest = load_manifest(bundle_copy)  # sha256 of both rewritten files checked here
    chosen = manifest.calibration["chosen"]["thresholds"]
    for graph in manifest.cascades:
        assert list(graph.default("thresholds")) == pytest.approx(chosen)
    report = tmp_path / "report.json"
    assert cli("run", bundle_copy, "--batch-size", 1, "--json", report).exit_code == 0
    chain = tmp_path / "chain.json"
    assert cli("run", bundle_copy, "--batch-size", 1, "--engine", "chain", "--json", chain).exit_code == 0
    assert json.loads(report.read_text())["exit_counts"] == json.loads(chain.read_text())["exit_counts"]
    verify = cli("verify", bundle_copy)
    assert verify.exit_code == 0 and f"ok   {CASCADE_B1_NAME} vs chain decisions" in verify.output


def test_static_batch_copies_hold_no_batch_one_graph(tiny_bundle, tmp_path):
    for batch in (1, 4):
        out = tmp_path / f"b{batch}"
        assert cli("static-batch", tiny_bundle, out, "--batch", batch).exit_code == 0
        manifest = load_manifest(out)
        assert manifest.cascade_b1 is None and not (out / CASCADE_B1_NAME).exists()
        assert (manifest.cascade is not None) == (batch == 1)  # batch 1: cascade.onnx is the batch-1 graph
