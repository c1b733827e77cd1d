"""cascade.onnx stores its per-exit vectors as constants (bare sessions load silently, take the image alone);
the runtime's copy takes them as inputs; bundles whose file takes them as inputs already keep working."""
import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import handmade
from edgeexit.cli import main
from edgeexit.errors import BundleError
from edgeexit.export.cascade_graph import write_cascade
from edgeexit.runtime import CascadeRunner, GraphRunner
from edgeexit.runtime.cascade_bytes import tunable_cascade_bytes
from edgeexit.runtime.bundle import save_manifest
from edgeexit.runtime.files import sha256_file
from edgeexit.runtime.manifest import CASCADE_NAME, VECTORS_CONSTANT, VECTORS_INPUT, load_manifest

# a session as a C/C++, Node or Python client opens it: default logging (warnings go to stderr), one run
BARE_SESSION = """
import sys, numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
shape = [1 if isinstance(d, str) else d for d in session.get_inputs()[0].shape]
session.run(None, {session.get_inputs()[0].name: np.zeros(shape, dtype=np.float32)})
print([i.name for i in session.get_inputs()])
"""


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Per policy, a hand-made bundle (known scores) with a freshly built cascade.onnx."""
    root = tmp_path_factory.mktemp("tunable")
    made = {}
    for kind, (threshold, args) in handmade.POLICY_DEFAULTS.items():
        bundle = handmade.write_bundle(root / kind, kind=kind, threshold=threshold, args=args)
        manifest = load_manifest(bundle, check_hashes=False)
        save_manifest(bundle, dataclasses.replace(manifest, cascade=write_cascade(manifest)))
        made[kind] = bundle
    return made


def older_layout(bundle, target):
    """A copy of `bundle` whose cascade.onnx is laid out as edgeexit wrote it before: vectors both initializers and inputs."""
    manifest = load_manifest(bundle)
    model = onnx.load(str(manifest.path(CASCADE_NAME)))
    for tensor in manifest.cascade.inputs[1:]:
        model.graph.input.append(helper.make_tensor_value_info(tensor.name, TensorProto.DOUBLE, list(tensor.shape)))
    target.mkdir()
    for entry in manifest.files():
        (target / entry.file).write_bytes(manifest.path(entry.file).read_bytes())
    onnx.save(model, str(target / CASCADE_NAME))
    cascade = dataclasses.replace(manifest.cascade, sha256=sha256_file(target / CASCADE_NAME), vectors=VECTORS_INPUT)
    save_manifest(target, dataclasses.replace(manifest, cascade=cascade))
    return target


def bare_session_stderr(path) -> tuple[str, str]:
    done = subprocess.run([sys.executable, "-c", BARE_SESSION, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


@pytest.mark.parametrize("kind", sorted(handmade.POLICY_DEFAULTS))
def test_bare_session_loads_without_warnings(bundles, kind, tmp_path):
    manifest = load_manifest(bundles[kind])
    assert manifest.cascade.vectors == VECTORS_CONSTANT and len(manifest.cascade.inputs) > 1
    stdout, stderr = bare_session_stderr(manifest.path(CASCADE_NAME))
    assert stdout.strip() == "['input']" and stderr == ""
    # the layout written before warns once per vector: what the check above would catch
    old = older_layout(bundles[kind], tmp_path / "old")
    _, stderr = bare_session_stderr(old / CASCADE_NAME)
    for tensor in manifest.cascade.inputs[1:]:
        assert f"Initializer {tensor.name} appears in graph inputs" in stderr


@pytest.mark.parametrize("kind", sorted(handmade.POLICY_DEFAULTS))
def test_tunable_copy_moves_only_the_vectors_into_inputs(bundles, kind):
    manifest = load_manifest(bundles[kind])
    stored = onnx.load(str(manifest.path(CASCADE_NAME)))
    tunable = onnx.load_from_string(tunable_cascade_bytes(manifest))
    onnx.checker.check_model(tunable, full_check=True)
    vectors = [t.name for t in manifest.cascade.inputs[1:]]
    assert [i.name for i in tunable.graph.input] == ["input", *vectors]
    for value in tunable.graph.input[1:]:
        tensor = value.type.tensor_type
        assert tensor.elem_type == TensorProto.DOUBLE and [d.dim_value for d in tensor.shape.dim] == [2]
    assert [i.name for i in stored.graph.initializer if i.name not in vectors] == [i.name for i in tunable.graph.initializer]
    assert {i.name for i in stored.graph.initializer} >= set(vectors)
    assert stored.graph.node == tunable.graph.node and stored.graph.output == tunable.graph.output
    assert stored.opset_import == tunable.opset_import and stored.ir_version == tunable.ir_version


@pytest.mark.parametrize("kind", sorted(handmade.POLICY_DEFAULTS))
def test_both_layouts_decide_as_the_chain(bundles, kind, tmp_path):
    x, _ = handmade.synthetic_scores(n=64)
    old = older_layout(bundles[kind], tmp_path / "old")
    assert tunable_cascade_bytes(load_manifest(old)) == (old / CASCADE_NAME).read_bytes()
    chain, new_graph, old_graph = CascadeRunner(bundles[kind]), GraphRunner(bundles[kind]), GraphRunner(old)
    sweep = [[0.0, 0.0], [0.5, 0.5], [0.9, 0.2], [1.0, 1.0]] if kind != "entropy" else [[10.0, 10.0], [0.6, 0.9], [0.0, 0.0]]
    for thresholds in sweep:
        want = chain.predict(x, thresholds=thresholds)
        for graph in (new_graph, old_graph):
            got = graph.predict(x, thresholds=thresholds)
            np.testing.assert_array_equal(got.predictions, want.predictions, err_msg=f"{kind} {thresholds}")
            np.testing.assert_array_equal(got.exit_index, want.exit_index, err_msg=f"{kind} {thresholds}")


def test_missing_constants_are_a_one_line_error(bundles, tmp_path):
    bundle = Path(shutil.copytree(bundles["confidence"], tmp_path / "bundle"))
    model = onnx.load(str(bundle / CASCADE_NAME))  # the manifest says the file holds thresholds as a constant: drop it
    kept = [init for init in model.graph.initializer if init.name != "thresholds"]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.save(model, str(bundle / CASCADE_NAME))
    manifest = load_manifest(bundle, check_hashes=False)
    save_manifest(bundle, dataclasses.replace(manifest, cascade=dataclasses.replace(manifest.cascade, sha256=sha256_file(bundle / CASCADE_NAME))))
    with pytest.raises(BundleError, match=r"lacks the constants \['thresholds'\]"):
        GraphRunner(bundle)
    result = CliRunner().invoke(main, ["run", str(bundle), "--engine", "graph"])
    assert result.exit_code == BundleError.exit_code and len(result.output.strip().splitlines()) == 1, result.output
