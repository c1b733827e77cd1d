"""cascade.onnx: the one-graph cascade decides exactly as the stage chain, for every policy and batch size."""
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import handmade

from edgeexit.cli import main
from edgeexit.export.cascade_graph import build_cascade, write_cascade
from edgeexit.runtime import CascadeRunner, ConfigError, GraphRunner, VerificationError, open_runner
from edgeexit.runtime.cascade_bytes import tunable_cascade_bytes
from edgeexit.runtime.verify import check_graph_decisions
from edgeexit.errors import BundleError
from edgeexit.runtime.manifest import CASCADE_NAME, MANIFEST_NAME, load_manifest
from edgeexit.runtime.bundle import save_manifest

# per policy: threshold vectors from "every input leaves at exit 0" to "none leaves"
SWEEPS = {
    "confidence": [[0.0, 0.0], [0.3, 0.6], [0.6, 0.3], [1.0, 0.0], [0.9, 0.9], [1.0, 1.0]],
    "max_softmax": [[0.0, 0.0], [0.5, 0.7], [0.8, 0.5], [1.0, 0.0], [0.95, 0.95], [1.0, 1.0]],
    "entropy": [[10.0, 10.0], [0.6, 0.9], [0.3, 1.2], [0.0, 10.0], [0.1, 0.1], [0.0, 0.0]],
    "exclusion": [[0.0, 0.0], [0.3, 0.5], [0.6, 0.2], [0.9, 0.9], [1.0, 1.0]],
}


def with_cascade(bundle):
    """Add cascade.onnx (built from the bundle's stage graphs) to a bundle and its manifest."""
    manifest = load_manifest(bundle, check_hashes=False)
    save_manifest(bundle, dataclasses.replace(manifest, cascade=write_cascade(manifest)))
    return bundle


@pytest.fixture(scope="module")
def handmade_bundles(tmp_path_factory):
    """Per policy, a hand-made bundle (known scores, no training) with its cascade.onnx, and its inputs."""
    root = tmp_path_factory.mktemp("handmade")
    bundles = {}
    for kind, (threshold, args) in handmade.POLICY_DEFAULTS.items():
        bundles[kind] = with_cascade(handmade.write_bundle(root / kind, kind=kind, threshold=threshold, args=args))
    x, _ = handmade.synthetic_scores(n=96)
    return bundles, x


def tunable_session(manifest):
    """A session of the runtime's copy of cascade.onnx: the per-exit vectors are graph inputs (all required)."""
    return ort.InferenceSession(tunable_cascade_bytes(manifest), providers=["CPUExecutionProvider"])


def graph_defaults(manifest):
    """The per-exit vectors at the manifest's defaults, as feeds."""
    return {t.name: np.array(t.default) for t in manifest.cascade.inputs[1:]}


@pytest.mark.parametrize("kind", sorted(SWEEPS))
def test_graph_decisions_equal_the_chain_with_thresholds_fed_as_inputs(handmade_bundles, kind):
    bundles, x = handmade_bundles
    chain, graph = CascadeRunner(bundles[kind], threads=1), GraphRunner(bundles[kind], threads=1)
    session = tunable_session(graph.manifest)
    seen_exits = set()
    for thresholds in SWEEPS[kind]:
        chain.set_thresholds(thresholds)
        want = chain.predict(x)
        seen_exits |= set(want.exit_index.tolist())
        feeds = {**graph_defaults(graph.manifest), "input": x, "thresholds": np.array(thresholds, dtype=np.float64)}
        scores, predictions, exit_index = session.run(None, feeds)
        np.testing.assert_array_equal(predictions, want.predictions, err_msg=f"{kind} {thresholds}")
        np.testing.assert_array_equal(exit_index, want.exit_index, err_msg=f"{kind} {thresholds}")
        assert scores.shape == (len(x), chain.manifest.num_classes)
        for i in range(0, len(x), 5):  # batch 1
            _, p1, e1 = session.run(None, {**feeds, "input": x[i : i + 1]})
            assert (p1[0], e1[0]) == (want.predictions[i], want.exit_index[i]), f"{kind} {thresholds} input {i}"
    assert seen_exits == {0, 1, 2}, f"the sweep reached only exits {seen_exits}"


@pytest.mark.parametrize("beta", [[0.0, 0.0], [0.5, 0.2], [0.85, 0.85], [1.0, 0.3]])
def test_exclusion_beta_fed_as_input(handmade_bundles, beta):
    bundles, x = handmade_bundles
    chain = CascadeRunner(bundles["exclusion"])
    for policy, value in zip(chain.policies, beta):
        policy.args["beta"] = value
    session = tunable_session(chain.manifest)
    _, predictions, exit_index = session.run(None, {**graph_defaults(chain.manifest), "input": x, "beta": np.array(beta)})
    want = chain.predict(x)
    np.testing.assert_array_equal(predictions, want.predictions)
    np.testing.assert_array_equal(exit_index, want.exit_index)


@pytest.mark.parametrize("kind", ["max_softmax", "entropy"])
def test_temperature_fed_as_input(handmade_bundles, kind):
    bundles, x = handmade_bundles
    chain = CascadeRunner(bundles[kind])
    session, defaults = tunable_session(chain.manifest), graph_defaults(chain.manifest)
    hot = session.run(None, {**defaults, "input": x, "temperature": np.array([3.0, 3.0])})[2]
    cold = session.run(None, {**defaults, "input": x, "temperature": np.array([0.3, 0.3])})[2]
    # a higher temperature flattens the softmax: fewer inputs are sure enough to leave early
    assert hot.mean() > cold.mean()


@pytest.fixture
def bundle(handmade_bundles, tmp_path):
    """A private copy of the hand-made confidence bundle with its cascade.onnx."""
    return Path(shutil.copytree(handmade_bundles[0]["confidence"], tmp_path / "bundle"))


def test_export_writes_and_verifies_cascade(tiny_bundle):
    manifest = load_manifest(tiny_bundle)
    assert manifest.cascade.file == CASCADE_NAME and manifest.path(CASCADE_NAME).is_file()
    assert [t.name for t in manifest.cascade.inputs] == ["input", "thresholds"]
    assert manifest.cascade.default("thresholds") == tuple(e.policy.threshold for e in manifest.exits)
    assert [(t.name, t.dtype) for t in manifest.cascade.outputs] == [
        ("scores", "float32"), ("prediction", "int64"), ("exit_index", "int64")]


def test_defaults_are_the_manifest_values(bundle, handmade_bundles):
    x = handmade_bundles[1]
    entry = load_manifest(bundle).cascade
    bare = ort.InferenceSession(str(bundle / CASCADE_NAME), providers=["CPUExecutionProvider"])
    assert [i.name for i in bare.get_inputs()] == ["input"] and bare.get_overridable_initializers() == []  # constants
    tunable = tunable_session(load_manifest(bundle))
    assert [(i.name, i.type) for i in tunable.get_inputs()] == [("input", "tensor(float)"), ("thresholds", "tensor(double)")]
    assert tunable.get_inputs()[1].shape == [2] and tunable.get_overridable_initializers() == []
    defaulted = bare.run(None, {"input": x})
    fed = tunable.run(None, {"input": x, "thresholds": np.array(entry.default("thresholds"))})
    for a, b in zip(defaulted, fed):
        np.testing.assert_array_equal(a, b)


def test_wrong_threshold_count_is_a_config_error(bundle, tmp_path, handmade_bundles):
    graph = GraphRunner(bundle)
    with pytest.raises(ConfigError, match="got 3 thresholds for 2 exits"):
        graph.set_thresholds([0.1, 0.2, 0.3])
    with pytest.raises(ConfigError, match="'thresholds' takes 2 values"):
        graph.run_graph(handmade_bundles[1][:1], {"thresholds": np.zeros(3)})
    np.save(tmp_path / "x.npy", handmade_bundles[1][:4])
    code, out = cli("run", bundle, "--engine", "graph", "--input", tmp_path / "x.npy", "--threshold", "0.1,0.2,0.3")
    assert code == ConfigError.exit_code and out.strip().splitlines() == ["error: got 3 thresholds for 2 exits"]


def test_a_graph_that_decides_differently_fails_verification(bundle, handmade_bundles):
    x = handmade_bundles[1]
    with pytest.raises(VerificationError, match="differs from the stage chain"):
        check_graph_decisions(GraphRunner(bundle, thresholds=0.0), CascadeRunner(bundle, thresholds=1.0), {"synthetic": x})


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_run_engines_print_the_same_decisions(bundle, handmade_bundles, tmp_path):
    np.save(tmp_path / "x.npy", handmade_bundles[1])
    reports = {}
    for engine in ("graph", "chain"):
        code, out = cli("run", bundle, "--engine", engine, "--input", tmp_path / "x.npy", "--batch-size", 7, "--json", tmp_path / f"{engine}.json")
        assert code == 0, out
        reports[engine] = json.loads((tmp_path / f"{engine}.json").read_text())
    assert reports["graph"]["engine"] == "graph" and reports["chain"]["engine"] == "chain"
    for key in ("predictions", "exit_index"):
        assert reports["graph"][key] == reports["chain"][key]
    assert set(reports["graph"]["exit_index"]) == {0, 1, 2}
    assert isinstance(open_runner(bundle), GraphRunner)


def test_graph_engine_without_cascade_is_a_one_line_error(bundle):
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    del data["cascade"]
    save_manifest(bundle, data)
    (bundle / CASCADE_NAME).unlink()
    code, out = cli("run", bundle, "--engine", "graph")
    assert code == BundleError.exit_code
    assert out.strip().splitlines() == [f"error: {bundle} has no cascade.onnx (exported by an older edgeexit): re-export it, or use --engine chain"]
    assert isinstance(open_runner(bundle), CascadeRunner)  # auto falls back to the chain
    code, out = cli("verify", bundle)
    assert "skip cascade.onnx vs chain decisions" in out


def test_verify_checks_the_cascade(bundle):
    code, out = cli("verify", bundle)
    assert "ok   cascade.onnx vs chain decisions" in out and "ok   sha256 cascade.onnx" in out, out
    with open(bundle / CASCADE_NAME, "ab") as fh:
        fh.write(b"\0")
    code, out = cli("verify", bundle)
    assert code == VerificationError.exit_code and "FAIL sha256 cascade.onnx" in out


def test_calibrated_thresholds_become_the_graph_defaults(bundle, handmade_bundles):
    from edgeexit.runtime.bundle import save_calibration

    record = {"chosen": {"thresholds": [0.3, 0.7]}, "policies": ["confidence"] * 2, "temperatures": [1.0, 1.0]}
    save_calibration(str(bundle), record)
    manifest = load_manifest(bundle)  # the sha256 of the rewritten cascade.onnx holds
    assert manifest.cascade.default("thresholds") == (0.3, 0.7)
    session = ort.InferenceSession(str(bundle / CASCADE_NAME), providers=["CPUExecutionProvider"])
    x = handmade_bundles[1]
    _, predictions, exit_index = session.run(None, {"input": x})  # thresholds left to their defaults
    chain = CascadeRunner(bundle)
    assert chain.thresholds == [0.3, 0.7]
    want = chain.predict(x)
    np.testing.assert_array_equal(predictions, want.predictions)
    np.testing.assert_array_equal(exit_index, want.exit_index)


@pytest.mark.parametrize("kind", sorted(SWEEPS))
def test_batch1_graph_decides_as_the_chain(handmade_bundles, tmp_path, kind):
    bundles, x = handmade_bundles
    chain = CascadeRunner(bundles[kind])
    path = tmp_path / "batch1.onnx"
    onnx.save(build_cascade(chain.manifest, compact=False), str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == 1
    want = chain.predict(x)
    assert set(want.exit_index.tolist()) == {0, 1, 2}
    for i in range(len(x)):
        _, p, e = session.run(None, {"input": x[i : i + 1]})
        assert (p[0], e[0]) == (want.predictions[i], want.exit_index[i]), f"input {i}"


@pytest.mark.parametrize("precision, differing, fails", [("fp32", 1, True), ("int8", 1, False), ("int8", 3, True)])
def test_int8_graphs_may_decide_one_percent_differently(bundle, handmade_bundles, precision, differing, fails):
    x = np.concatenate([handmade_bundles[1]] * 4)[:200]  # 1% of 200 inputs: 2 may differ at int8
    graph, chain = GraphRunner(bundle), CascadeRunner(bundle)
    graph.manifest = dataclasses.replace(graph.manifest, precision=precision)
    honest = graph.predict

    def off_by(part):  # the whole batch comes back with `differing` exit indices changed
        result = honest(part)
        if len(part) == len(x):
            result.exit_index[:differing] = (result.exit_index[:differing] + 1) % (len(graph.manifest.exits) + 1)
        return result

    graph.predict = off_by
    if fails:
        with pytest.raises(VerificationError, match="differs from the stage chain on synthetic input 0 at batch 200"):
            check_graph_decisions(graph, chain, {"synthetic": x})
    else:
        assert check_graph_decisions(graph, chain, {"synthetic": x})["synthetic"]["differing_decisions"] == differing
