"""Manifest schema, version and sha256 checks, and the stage chain checked against the real graphs."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgeexit.runtime import BundleError, CascadeRunner, load_manifest
from edgeexit.runtime.manifest import FORMAT_VERSION, MANIFEST_NAME, TensorSpec, validate
from edgeexit.runtime.cascade import check_graph_io
from edgeexit.runtime.bundle import save_manifest
from edgeexit.runtime.files import sha256_file


def read(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST_NAME).read_text())


def write(bundle: Path, data: dict) -> None:
    """Write a manifest as-is (no validation), the way a hand edit or a bad tool would."""
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))


def test_exported_manifest_is_valid_and_round_trips(bundle_copy):
    data = read(bundle_copy)
    validate(data)
    save_manifest(bundle_copy, data)
    assert load_manifest(bundle_copy).to_dict() == data


def test_future_version_is_refused_naming_both_versions(bundle_copy):
    data = read(bundle_copy)
    data["format_version"] = FORMAT_VERSION + 1
    data["stages"] = "a future layout"
    write(bundle_copy, data)
    with pytest.raises(BundleError) as info:
        load_manifest(bundle_copy)
    assert f"version {FORMAT_VERSION + 1}" in str(info.value) and f"version {FORMAT_VERSION}" in str(info.value)


def _drop_layout(d):
    del d["input"]["layout"]


def _retype_threshold(d):
    d["stages"][0]["exit"]["policy"]["threshold"] = "high"


def _break_chain_name(d):
    d["stages"][1]["inputs"][0]["name"] = "features_x"


def _break_chain_shape(d):
    d["stages"][1]["inputs"][0]["shape"][1] += 1


def _fixed_batch(d):
    d["input"]["shape"][0] = 1


def _short_sha(d):
    d["stages"][0]["sha256"] = "abc"


def _zero_full_macs(d):
    d["full"]["macs"] = 0


def _path_escape(d):
    d["full"]["file"] = "../full.onnx"


def _nan_std(d):
    d["input"]["std"] = [float("nan")] * len(d["input"]["std"])


def _role_not_a_name(d):
    d["stages"][0]["exit"]["outputs"]["logits"] = 7


@pytest.mark.parametrize(
    "mutate, where",
    [
        (_drop_layout, "missing key 'layout'"),
        (_retype_threshold, "threshold: expected int or float, got str"),
        (_break_chain_name, "stages[1].inputs"),
        (_break_chain_shape, "stages[1].inputs"),
        (_fixed_batch, "input.shape"),
        (_short_sha, "stages[0].sha256"),
        (_zero_full_macs, "full.macs"),
        (_path_escape, "full.file"),
        (_nan_std, "input.std"),
        (_role_not_a_name, "stages[0].exit.outputs"),
    ],
)
def test_schema_violations_name_the_field(bundle_copy, mutate, where):
    data = read(bundle_copy)
    mutate(data)
    write(bundle_copy, data)
    with pytest.raises(BundleError, match="invalid manifest") as info:
        load_manifest(bundle_copy)
    assert where in str(info.value)


def test_garbage_json_is_a_bundle_error(bundle_copy):
    (bundle_copy / MANIFEST_NAME).write_text("[" * 100_000)
    with pytest.raises(BundleError, match="cannot read"):
        load_manifest(bundle_copy)


def test_tampered_and_missing_graphs_are_refused_by_name(bundle_copy):
    with open(bundle_copy / "stage_1.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match=r"stage_1\.onnx does not match its sha256"):
        CascadeRunner(bundle_copy)
    (bundle_copy / "full.onnx").unlink()
    (bundle_copy / "stage_1.onnx").unlink()
    with pytest.raises(BundleError, match=r"missing: .*stage_1\.onnx"):
        load_manifest(bundle_copy)


def _rename_features(d, bundle: Path):
    """Consistent manifest (schema passes) that misnames the graph's real output."""
    d["stages"][0]["outputs"][0]["name"] = "renamed"
    d["stages"][1]["inputs"][0]["name"] = "renamed"


def _reshape_features(d, bundle: Path):
    for tensor in (d["stages"][0]["outputs"][0], d["stages"][1]["inputs"][0]):
        tensor["shape"][-1] += 1


def _swap_graphs(d, bundle: Path):
    """stage_2.onnx replaced by full.onnx, hash updated: the file is genuine but the wrong graph."""
    (bundle / "stage_2.onnx").write_bytes((bundle / "full.onnx").read_bytes())
    d["stages"][2]["sha256"] = sha256_file(bundle / "stage_2.onnx")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_rename_features, "stage_0.onnx: output 'features_0' is declared as 'renamed'"),
        (_reshape_features, "stage_0.onnx: output 'features_0' has shape"),
        (_swap_graphs, "stage_2.onnx: input 'input' is declared as 'features_1'"),
    ],
)
def test_manifest_chain_is_checked_against_the_graphs(bundle_copy, mutate, message):
    data = read(bundle_copy)
    mutate(data, bundle_copy)
    save_manifest(bundle_copy, data)  # the schema alone cannot see the mismatch
    with pytest.raises(BundleError) as info:
        CascadeRunner(bundle_copy)
    assert message in str(info.value)


def test_graph_io_check_refuses_fixed_batch_and_other_dtypes():
    declared = [TensorSpec("x", ("batch", 3))]
    arg = lambda shape, kind="tensor(float)": SimpleNamespace(name="x", shape=shape, type=kind)  # noqa: E731
    check_graph_io("g.onnx", declared, declared, [arg(["N", 3])], [arg([None, 3])])
    with pytest.raises(BundleError, match="has shape"):
        check_graph_io("g.onnx", declared, declared, [arg([1, 3])], [arg(["N", 3])])
    with pytest.raises(BundleError, match="type tensor"):
        check_graph_io("g.onnx", declared, declared, [arg(["N", 3], "tensor(double)")], [arg(["N", 3])])
    with pytest.raises(BundleError, match="has 2 outputs"):
        check_graph_io("g.onnx", declared, declared, [arg(["N", 3])], [arg(["N", 3]), arg(["N", 3])])


def test_bundles_have_one_writer():
    """Only runtime/bundle.py saves a manifest or writes manifest.json, and no producer edits `to_dict()` output:
    export, quantize, static-batch, calibrate and profile all go through its typed record edits."""
    import re

    root = Path(__file__).resolve().parents[1]
    writes = re.compile(r"def save_manifest|(write_json_atomic|write_text|write_bytes)\([^)]*MANIFEST_NAME|"
                        r"\w+ = \w+\.to_dict\(\)")
    sources = [*root.glob("runtime/*.py"), *root.glob("export/*.py"), *root.glob("edgeexit/**/*.py")]
    assert len(sources) > 20
    offenders = [str(p.relative_to(root)) for p in sources if p != root / "runtime" / "bundle.py" and writes.search(p.read_text())]
    assert offenders == []
    assert writes.search((root / "runtime" / "bundle.py").read_text())  # the pattern does find the one writer
