"""cascade.onnx: the one-graph cascade decides exactly as the stage chain, for every policy and batch size."""
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from edgeexit.cli import main
from edgeexit.export.cascade_graph import write_cascade
from edgeexit.runtime import CascadeRunner, ConfigError, GraphRunner, VerificationError, open_runner
from edgeexit.runtime.consistency import check_graph_decisions
from edgeexit.errors import BundleError
from edgeexit.runtime.manifest import CASCADE_NAME, MANIFEST_NAME, load_manifest, save_manifest

# per policy: threshold vectors from "every input leaves at exit 0" to "none leaves", one sending all to exit 1
SWEEPS = {
    "confidence": [[0.0, 0.0], [0.3, 0.6], [0.6, 0.3], [1.0, 0.0], [0.9, 0.9], [1.0, 1.0]],
    "max_softmax": [[0.0, 0.0], [0.2, 0.4], [0.5, 0.3], [1.0, 0.0], [0.8, 0.8], [1.0, 1.0]],
    "entropy": [[10.0, 10.0], [0.5, 1.0], [1.5, 0.8], [0.0, 10.0], [2.0, 2.0], [0.0, 0.0]],
    "exclusion": [[0.0, 0.0], [0.3, 0.5], [0.6, 0.2], [0.9, 0.9], [1.0, 1.0]],
}


def with_policy(src, dst, kind):
    """A copy of bundle `src` whose exits use policy `kind`, with its cascade.onnx rebuilt."""
    shutil.copytree(src, dst)
    data = json.loads((dst / MANIFEST_NAME).read_text())
    for stage in data["stages"][:-1]:
        stage["exit"]["policy"] = {**stage["exit"]["policy"], "kind": kind, "threshold": SWEEPS[kind][1][0]}
    save_manifest(dst, data)
    data["cascade"] = write_cascade(load_manifest(dst, check_hashes=False))
    save_manifest(dst, data)
    return dst


@pytest.fixture(scope="module")
def policy_bundles(tmp_path_factory, tiny_bundle, exclusion_bundle):
    root = tmp_path_factory.mktemp("policies")
    bundles = {kind: with_policy(tiny_bundle, root / kind, kind) for kind in ("max_softmax", "entropy")}
    return {"confidence": tiny_bundle, "exclusion": exclusion_bundle[0], **bundles}


@pytest.mark.parametrize("kind", sorted(SWEEPS))
def test_graph_decisions_equal_the_chain_with_thresholds_fed_as_inputs(policy_bundles, digits_test, kind):
    bundle = policy_bundles[kind]
    chain, graph = CascadeRunner(bundle, threads=1), GraphRunner(bundle, threads=1)
    x = np.concatenate([digits_test[0][:48], np.random.default_rng(0).standard_normal((16, *chain.manifest.input_shape)).astype(np.float32)])
    session = ort.InferenceSession(str(graph.manifest.path(CASCADE_NAME)), providers=["CPUExecutionProvider"])
    seen_exits = set()
    for thresholds in SWEEPS[kind]:
        chain.set_thresholds(thresholds)
        want = chain.predict(x)
        seen_exits |= set(want.exit_index.tolist())
        feeds = {"input": x, "thresholds": np.array(thresholds, dtype=np.float64)}
        if kind == "exclusion":
            feeds["beta"] = np.array([p.args["beta"] for p in chain.policies])
        scores, predictions, exit_index = session.run(None, feeds)
        np.testing.assert_array_equal(predictions, want.predictions, err_msg=f"{kind} {thresholds}")
        np.testing.assert_array_equal(exit_index, want.exit_index, err_msg=f"{kind} {thresholds}")
        assert scores.shape == (len(x), chain.manifest.num_classes)
        for i in range(0, len(x), 8):  # batch 1
            _, p1, e1 = session.run(None, {**feeds, "input": x[i : i + 1]})
            assert (p1[0], e1[0]) == (want.predictions[i], want.exit_index[i])
    # class exclusion cannot be forced to one exit by thresholds; beta is swept below
    assert len(seen_exits) >= (2 if kind == "exclusion" else 3), f"the sweep reached only exits {seen_exits}"


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.85, 1.0])
def test_exclusion_beta_fed_as_input(exclusion_bundle, digits_test, beta):
    bundle = exclusion_bundle[0]
    chain = CascadeRunner(bundle, policy_args={"beta": beta})
    graph = GraphRunner(bundle, policy_args={"beta": beta})
    np.testing.assert_array_equal(graph.feeds()["beta"], [beta, beta])
    x = digits_test[0][:64]
    check_graph_decisions(graph, chain, {"digits": x})


def test_defaults_are_the_manifest_values_and_the_manifest_describes_the_graph(tiny_bundle):
    manifest = load_manifest(tiny_bundle)
    entry = manifest.cascade
    session = ort.InferenceSession(str(manifest.path(CASCADE_NAME)), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [(o.name, o.type) for o in session.get_outputs()] == [
        ("scores", "tensor(float)"), ("prediction", "tensor(int64)"), ("exit_index", "tensor(int64)")]
    assert [t["name"] for t in entry["inputs"]] == ["input", "thresholds"]
    assert entry["inputs"][1]["default"] == [e["policy"]["threshold"] for e in manifest.exits]
    x = np.zeros((3, *manifest.input_shape), dtype=np.float32)
    defaulted = session.run(None, {"input": x})
    fed = session.run(None, {"input": x, "thresholds": np.array(entry["inputs"][1]["default"])})
    for a, b in zip(defaulted, fed):
        np.testing.assert_array_equal(a, b)


def test_wrong_threshold_count_is_a_config_error(tiny_bundle):
    graph = GraphRunner(tiny_bundle)
    with pytest.raises(ConfigError, match="got 3 thresholds for 2 exits"):
        graph.set_thresholds([0.1, 0.2, 0.3])
    x = np.zeros((1, *graph.manifest.input_shape), dtype=np.float32)
    with pytest.raises(ConfigError, match="'thresholds' takes 2 values"):
        graph.run_graph(x, {"thresholds": np.zeros(3)})


def test_a_graph_that_decides_differently_fails_verification(tiny_bundle, digits_test):
    with pytest.raises(VerificationError, match="differs from the stage chain"):
        check_graph_decisions(GraphRunner(tiny_bundle, thresholds=0.0), CascadeRunner(tiny_bundle, thresholds=1.0), {"digits": digits_test[0][:8]})


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_run_engines_print_the_same_decisions(tiny_bundle, digits_test, tmp_path):
    np.save(tmp_path / "x.npy", digits_test[0][:20])
    outputs = {}
    for engine in ("graph", "chain"):
        code, out = cli("run", tiny_bundle, "--engine", engine, "--input", tmp_path / "x.npy", "--batch-size", 4, "--json", tmp_path / f"{engine}.json")
        assert code == 0, out
        outputs[engine] = json.loads((tmp_path / f"{engine}.json").read_text())
    assert outputs["graph"]["engine"] == "graph" and outputs["chain"]["engine"] == "chain"
    for key in ("predictions", "exit_index"):
        assert outputs["graph"][key] == outputs["chain"][key]
    assert isinstance(open_runner(tiny_bundle), GraphRunner)


def test_graph_engine_without_cascade_is_a_one_line_error(bundle_copy):
    data = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    del data["cascade"]
    save_manifest(bundle_copy, data)
    (bundle_copy / CASCADE_NAME).unlink()
    code, out = cli("run", bundle_copy, "--engine", "graph")
    assert code == BundleError.exit_code
    assert out.strip().splitlines() == [f"error: {bundle_copy} has no cascade.onnx (exported by an older edgeexit): re-export it, or use --engine chain"]
    assert isinstance(open_runner(bundle_copy), CascadeRunner)  # auto falls back to the chain
    code, out = cli("verify", bundle_copy)
    assert code == 0 and "skip cascade.onnx vs chain decisions" in out


def test_verify_checks_the_cascade(bundle_copy):
    code, out = cli("verify", bundle_copy)
    assert code == 0 and "ok   cascade.onnx vs chain decisions" in out and "ok   sha256 cascade.onnx" in out
    with open(bundle_copy / CASCADE_NAME, "ab") as fh:
        fh.write(b"\0")
    code, out = cli("verify", bundle_copy)
    assert code != 0 and "FAIL sha256 cascade.onnx" in out


def test_calibrated_thresholds_become_the_graph_defaults(bundle_copy, digits_test):
    from edgeexit.runtime.calibrate import apply_calibration

    apply_calibration(str(bundle_copy), {"chosen": {"thresholds": [0.3, 0.7]}})
    manifest = load_manifest(bundle_copy)  # sha256 of the rewritten cascade.onnx holds
    assert manifest.cascade["inputs"][1]["default"] == [0.3, 0.7]
    session = ort.InferenceSession(str(manifest.path(CASCADE_NAME)), providers=["CPUExecutionProvider"])
    x = digits_test[0][:64]
    _, predictions, exit_index = session.run(None, {"input": x})  # thresholds left to their defaults
    want = CascadeRunner(bundle_copy).predict(x)
    assert CascadeRunner(bundle_copy).thresholds == [0.3, 0.7]
    np.testing.assert_array_equal(predictions, want.predictions)
    np.testing.assert_array_equal(exit_index, want.exit_index)
