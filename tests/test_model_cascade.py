"""Model cascades: `export SMALL.pt MID.pt BIG.pt OUT/` (whole models as stages, each reading the input), checked
against a hand-made reference from the member models; pretrain's model.pt as a static bundle and as --weights."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from edgeexit.cli import main
from edgeexit.export import export_bundle
from edgeexit.export.cascade_graph import rebuild_cascade
from edgeexit.runtime.bundle import save_manifest, with_exits
from edgeexit.runtime.cascade import CascadeRunner
from edgeexit.runtime.datasets import load_eval_data
from edgeexit.runtime.graph import GraphRunner
from edgeexit.runtime.manifest import READS_FEATURES, READS_INPUT, PolicySpec, load_manifest
from edgeexit.train.backbones import build_backbone
from edgeexit.train.config import PRETRAIN, ModelConfig
from edgeexit.train.models import EarlyExitModel, load_model, save_model
from edgeexit.train.pretrained import STATIC_METHOD, load_backbone_weights, pretrain_backbone

SHARE = 0.35  # of the inputs reaching an exit, about this many leave there under the test's thresholds


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _member(config: ModelConfig, path: Path, seed: int, **changes) -> Path:
    """An untrained resnet8 model.pt sharing `config`'s input (a second static model, or one with exits)."""
    config = dataclasses.replace(config, **changes)
    torch.manual_seed(seed)
    save_model(EarlyExitModel(config, build_backbone(config.backbone, config.num_classes, config.input_shape[0])), path)
    return path


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> list[Path]:
    """small (pretrained, static), mid (two exits) and big (static) resnet8 model.pt files on 16x16 digits."""
    root = tmp_path_factory.mktemp("members")
    small = root / "small.pt"
    pretrain_backbone(dataclasses.replace(PRETRAIN, backbone="resnet8", input_size=16, epochs=1), small, progress=False)
    config = load_model(small).config
    mid = _member(config, root / "mid.pt", 1, method="eenet", exit_type="plain", cuts=["layer1.0", "layer2.0"],
                  policy=PolicySpec("max_softmax", 0.9))
    return [small, mid, _member(config, root / "big.pt", 2)]


@pytest.fixture(scope="module")
def bundle(members, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cascade") / "bundle"
    export_bundle(members, out)  # verified: each member's stages and full.onnx against PyTorch, cascade graphs vs chain
    return out


@pytest.fixture(scope="module")
def data(bundle) -> tuple[np.ndarray, np.ndarray]:
    return load_eval_data("digits", "test", load_manifest(bundle).input_spec)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@torch.no_grad()
def reference_logits(members: list[Path], x: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Each exit's logits and the final logits, from the member models in PyTorch (no bundle involved)."""
    exits = []
    t = torch.from_numpy(x)
    for path in members:
        model = load_model(path)
        outputs, final = model(t)
        exits += [head_out[list(head.outputs).index("logits")].numpy() for head, head_out in zip(model.exits, outputs)]
        exits.append(final.numpy())
    return exits[:-1], exits[-1]


def leaving_thresholds(probabilities: list[np.ndarray]) -> list[float]:
    """Per exit, a max-softmax threshold midway between two scores of the inputs still in, so about SHARE leave there."""
    alive = np.ones(len(probabilities[0]), dtype=bool)
    thresholds = []
    for p in probabilities:
        scores = p.max(axis=1)
        ranked = np.sort(scores[alive])[::-1]
        m = max(1, int(SHARE * len(ranked)))
        thresholds.append(float((ranked[m - 1] + ranked[m]) / 2))
        alive &= scores < thresholds[-1]
    return thresholds


def reference_decisions(exits: list[np.ndarray], final: np.ndarray, thresholds: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Max-softmax by hand: each input leaves at its first exit whose top probability reaches that exit's threshold."""
    n = len(final)
    prediction, exit_index = final.argmax(axis=1), np.full(n, len(exits))
    for k in reversed(range(len(exits))):
        leaves = _softmax(exits[k]).max(axis=1) >= thresholds[k]
        prediction = np.where(leaves, exits[k].argmax(axis=1), prediction)
        exit_index = np.where(leaves, k, exit_index)
    return prediction, exit_index


def test_manifest_says_what_each_stage_reads(bundle, members):
    manifest = load_manifest(bundle)
    assert [s.reads for s in manifest.stages] == [READS_INPUT, READS_INPUT, READS_FEATURES, READS_FEATURES, READS_INPUT]
    assert [s.features is None for s in manifest.stages] == [True, False, False, True, True]
    assert [set(e.outputs) for e in manifest.exits][0] == {"logits"} and manifest.exits[3].outputs.keys() == {"logits"}
    assert [m.stages for m in manifest.model.members] == [1, 3, 1]
    assert [m.method for m in manifest.model.members] == [STATIC_METHOD, "eenet", STATIC_METHOD]
    assert manifest.model.members[1].sha256 == __import__("hashlib").sha256(members[1].read_bytes()).hexdigest()
    costs = manifest.exit_costs()
    assert costs == sorted(costs) and costs[-1] > 2  # cumulative: three resnet8s against the last one's MACs
    raw = json.loads((bundle / "manifest.json").read_text())
    assert [s["reads"] for s in raw["stages"]] == [s.reads for s in manifest.stages]


@pytest.fixture(scope="module")
def tuned(bundle, members, data, tmp_path_factory) -> tuple[Path, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """A copy of the bundle with thresholds that send some inputs out at every stage, cascade graphs rebuilt for them."""
    x = data[0][:64]
    exits, final = reference_logits(members, x)
    thresholds = leaving_thresholds([_softmax(z) for z in exits])
    out = tmp_path_factory.mktemp("tuned") / "bundle"
    shutil.copytree(bundle, out)
    save_manifest(out, with_exits(load_manifest(out), thresholds=thresholds))
    rebuild_cascade(out, x)
    return out, x, reference_decisions(exits, final, thresholds)


def test_decisions_equal_chain_graphs_and_reference(tuned):
    bundle, x, (prediction, exit_index) = tuned
    manifest = load_manifest(bundle)
    assert (np.bincount(exit_index, minlength=5) > 0).all(), "every stage must take inputs"
    chain, graph = CascadeRunner(bundle), GraphRunner(bundle)
    bare = ort.InferenceSession(str(bundle / manifest.cascade.file))  # the file itself: thresholds as constants
    bare_b1 = ort.InferenceSession(str(bundle / manifest.cascade_b1.file))
    for batch in (64, 1):
        for start in range(0, 64 if batch == 64 else 24, batch):
            part = slice(start, start + batch)
            for result in (chain.predict(x[part]), graph.predict(x[part])):
                np.testing.assert_array_equal(result.predictions, prediction[part])
                np.testing.assert_array_equal(result.exit_index, exit_index[part])
            sessions = [bare] + ([bare_b1] if batch == 1 else [])
            for session in sessions:
                _, pred, where = session.run(None, {manifest.input_spec.name: x[part]})
                np.testing.assert_array_equal(pred, prediction[part])
                np.testing.assert_array_equal(where, exit_index[part])


@pytest.mark.slow
def test_node_client_runs_the_model_cascade(tuned, tmp_path):
    node, example = shutil.which("node"), Path(__file__).resolve().parent.parent / "examples" / "node"
    if node is None or not (example / "node_modules" / "onnxruntime-node").is_dir():
        pytest.skip("node or onnxruntime-node is not installed: cd examples/node && npm install --ignore-scripts")
    bundle, x, (prediction, exit_index) = tuned
    np.save(tmp_path / "x.npy", x)
    done = subprocess.run([node, str(example / "run_cascade.js"), str(bundle), str(tmp_path / "x.npy")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = invoke("run", bundle, "--engine", "chain", "--input", tmp_path / "x.npy")
    expected = [line for line in result.output.splitlines() if "\texit " in line]
    assert done.stdout.splitlines() == expected and len(expected) == len(x)
    assert [int(line.rsplit(" ", 1)[1]) for line in expected] == exit_index.tolist()


def test_ensemble_at_deferral_matches_hand_computation(bundle, members, data, tmp_path):
    x = data[0][:64]
    exits, final = reference_logits(members, x)
    probabilities = [_softmax(z) for z in exits]
    means = [np.mean(probabilities[: k + 1], axis=0) for k in range(len(exits))]  # weights all 1
    thresholds = leaving_thresholds(means)
    prediction = np.mean([*probabilities, _softmax(final)], axis=0).argmax(axis=1)
    exit_index = np.full(len(x), len(exits))
    for k in reversed(range(len(exits))):
        leaves = means[k].max(axis=1) >= thresholds[k]
        prediction, exit_index = np.where(leaves, means[k].argmax(axis=1), prediction), np.where(leaves, k, exit_index)
    assert (np.bincount(exit_index, minlength=5) > 0).all()
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    save_manifest(copy, with_exits(load_manifest(copy), thresholds=thresholds, ensemble="mean"))
    rebuild_cascade(copy, x)
    for result in (CascadeRunner(copy).predict(x), GraphRunner(copy).predict(x)):
        np.testing.assert_array_equal(result.exit_index, exit_index)
        np.testing.assert_array_equal(result.predictions, prediction)


def test_verify_and_no_exit_chain_is_full(bundle, data):
    result = invoke("verify", bundle)
    assert result.exit_code == 0, result.output
    runner = CascadeRunner(bundle)
    np.testing.assert_array_equal(runner.predict(data[0][:32], use_exits=False).predictions,
                                  runner.predict_full(data[0][:32]).argmax(axis=1))


def test_calibrate_auto_with_ensembles(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    result = invoke("calibrate", copy, "--data", "digits", "--split", "val", "--target-drop", "1", "--policy", "auto")
    assert result.exit_code == 0, result.output
    manifest = load_manifest(copy)
    assert manifest.calibration is not None and {p.kind for p in manifest.policies} <= {"max_softmax", "entropy"}
    x, _ = load_eval_data("digits", "val", manifest.input_spec)
    chain, graph = CascadeRunner(copy), GraphRunner(copy)
    np.testing.assert_array_equal(chain.predict(x[:64]).exit_index, graph.predict(x[:64]).exit_index)


@pytest.mark.slow
def test_quantize_and_static_batch(bundle, tmp_path):
    int8 = tmp_path / "int8"
    result = invoke("quantize", bundle, int8, "--data", "digits", "--split", "val")
    assert result.exit_code == 0, result.output
    assert [s.reads for s in load_manifest(int8).stages] == [s.reads for s in load_manifest(bundle).stages]
    fixed = tmp_path / "b1"
    result = invoke("static-batch", bundle, fixed, "--batch", "1")
    assert result.exit_code == 0, result.output
    x = np.random.default_rng(0).standard_normal((5, *load_manifest(fixed).input_shape)).astype(np.float32)
    np.testing.assert_array_equal(CascadeRunner(fixed).predict(x).predictions, CascadeRunner(bundle).predict(x).predictions)


@pytest.mark.slow
def test_profile_latency_budget_and_bench(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    for engine in ("chain", "graph"):
        result = invoke("profile", copy, "--engine", engine, "--repeats", "4", "--threads", "1")
        assert result.exit_code == 0, result.output
    profiles = {p.engine: p for p in load_manifest(copy).profiles.values()}
    assert len(profiles["chain"].stages) == len(profiles["graph"].exits) == 5
    result = invoke("calibrate", copy, "--data", "digits", "--split", "val", "--latency-budget", "1000", "--threads", "1")
    assert result.exit_code == 0, result.output
    result = invoke("bench", copy, "--data", "digits", "--limit", "32", "--sweep-points", "2", "--threads", "1",
                    "--out", tmp_path / "bench")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "bench" / "bench.json").is_file()


@pytest.mark.parametrize("changes, named", [
    ({"input_shape": (1, 12, 12)}, "input shape"),
    ({"input_shape": (3, 16, 16), "mean": [0.1] * 3, "std": [0.2] * 3}, "input channels"),
    ({"mean": [0.3]}, "mean"),
    ({"num_classes": 5, "class_names": list("abcde")}, "number of classes"),
    ({"class_names": list("abcdefghij")}, "class names"),
])
def test_members_whose_inputs_disagree_are_one_line_errors(members, tmp_path, changes, named):
    other = _member(load_model(members[0]).config, tmp_path / "other.pt", 3, **changes)
    result = invoke("export", members[0], other, tmp_path / "out")
    assert result.exit_code != 0
    line = result.output.strip()
    assert "\n" not in line and f"disagree on {named}:" in line and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_pretrained_static_model_exports_and_is_read_by_weights(members, tmp_path):
    result = invoke("export", members[0], tmp_path / "static")
    assert result.exit_code == 0, result.output
    manifest = load_manifest(tmp_path / "static")
    assert len(manifest.stages) == 1 and manifest.exits == [] and manifest.cascade is None
    assert manifest.stages[0].macs.cumulative == manifest.full.macs
    result = invoke("verify", tmp_path / "static")
    assert result.exit_code == 0 and "(a static network: no exit)" in result.output, result.output
    result = invoke("run", tmp_path / "static", "--data", "digits", "--engine", "graph")
    assert result.exit_code != 0 and "static network (no exit)" in result.output and "\n" not in result.output.strip()
    result = invoke("calibrate", tmp_path / "static", "--data", "digits", "--target-drop", "1")
    assert result.exit_code != 0 and "nothing to calibrate" in result.output
    model = load_model(members[0])
    net = build_backbone("resnet8", 10, 1)
    load_backbone_weights(net, members[0])  # what train --weights does with the file
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(net.state_dict()[key], value)
    x = np.random.default_rng(0).standard_normal((4, 1, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(CascadeRunner(manifest).predict(x).predictions,
                                  model.backbone.eval()(torch.from_numpy(x)).argmax(1).numpy())
