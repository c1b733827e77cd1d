"""Fuzz: mutated manifests, garbled graph files and random input arrays either work or raise the
project's own error types, through the Python API and through the CLI (never a traceback).

Run with `--hypothesis-show-statistics` to see how many cases each test ran, and with
EDGEEXIT_FUZZ_EXAMPLES=N for a longer hunt than the default 60 cases per test.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeexit.cli import main
from edgeexit.runtime import CascadeRunner, EdgeExitError, InputError, open_runner
from edgeexit.runtime.manifest import MANIFEST_NAME
from edgeexit.runtime.files import sha256_file

EXAMPLES = int(os.environ.get("EDGEEXIT_FUZZ_EXAMPLES", "60"))  # raise it for a long hunt
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
GRAPHS = ["stage_0.onnx", "stage_1.onnx", "stage_2.onnx", "full.onnx", "cascade.onnx", "cascade_b1.onnx"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def paths(node, prefix=()) -> list[tuple]:
    """Every key path inside a JSON document."""
    found = [prefix] if prefix else []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        found += paths(value, (*prefix, key))
    return found


def exercise(bundle: Path) -> int:
    """Load and run a possibly broken bundle as a device would (full.onnx too); only EdgeExitError
    may escape. Returns the exit code `edgeexit run` must give (run never loads full.onnx; it runs
    the engine open_runner picks at its default batch size of 1)."""
    try:
        runner = open_runner(bundle, threads=1, batch_size=1)
    except EdgeExitError as exc:
        return exc.exit_code
    x = np.zeros((2, *runner.manifest.input_shape), np.float32)
    try:
        runner.predict_full(x)
    except EdgeExitError:
        pass
    try:
        runner.predict(x)
    except EdgeExitError as exc:
        return exc.exit_code
    return 0


def cli(*args) -> int:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output and "unexpected" not in result.output, result.output
    if result.exit_code:
        assert result.output.startswith("error: ") or "FAIL" in result.output, result.output
    return result.exit_code


@pytest.fixture(scope="module")
def work(tiny_bundle, tmp_path_factory) -> Path:
    """A scratch folder with a pristine bundle copy and a valid input file."""
    root = tmp_path_factory.mktemp("fuzz")
    np.save(root / "x.npy", np.zeros((2, *json.loads((tiny_bundle / MANIFEST_NAME).read_text())["input"]["shape"][1:]), np.float32))
    return root


def fresh_copy(tiny_bundle: Path) -> Path:
    return Path(shutil.copytree(tiny_bundle, Path(tempfile.mkdtemp(prefix="fuzz-")) / "bundle"))


@FUZZ
@given(data=st.data())
def test_mutated_manifests(tiny_bundle, work, data):
    bundle = fresh_copy(tiny_bundle)
    try:
        manifest = json.loads((bundle / MANIFEST_NAME).read_text())
        kind = data.draw(st.sampled_from(["delete", "replace", "garbage"]))
        if kind == "garbage":
            text = data.draw(st.text(max_size=64) | st.just("[" * 50_000) | st.just(json.dumps(manifest)[:200]))
        else:
            path = data.draw(st.sampled_from(paths(manifest)))
            parent = manifest
            for key in path[:-1]:
                parent = parent[key]
            if kind == "delete":
                del parent[path[-1]]
            else:
                parent[path[-1]] = data.draw(json_values)
            text = json.dumps(manifest)
        (bundle / MANIFEST_NAME).write_text(text)
        expected = exercise(bundle)
        assert cli("run", bundle, "--input", work / "x.npy", "--threads", "1") == expected
        assert cli("info", bundle) in (0, expected)
    finally:
        shutil.rmtree(bundle.parent)


@FUZZ
@given(
    name=st.sampled_from(GRAPHS),
    how=st.sampled_from(["truncate", "flip", "overwrite", "random"]),
    where=st.floats(0, 1),
    noise=st.binary(min_size=1, max_size=64),
    update_hash=st.booleans(),
)
def test_garbled_graphs(tiny_bundle, work, name, how, where, noise, update_hash):
    bundle = fresh_copy(tiny_bundle)
    try:
        path = bundle / name
        data = bytearray(path.read_bytes())
        at = int(where * (len(data) - 1))
        if how == "truncate":
            data = data[:at]
        elif how == "flip":
            for i, byte in enumerate(noise):
                data[(at + 97 * i) % len(data)] ^= byte or 1
        elif how == "overwrite":
            data[at : at + len(noise)] = noise
        else:
            data = bytearray(noise)
        path.write_bytes(bytes(data))
        changed = sha256_file(path) != sha256_file(tiny_bundle / name)
        if update_hash:
            manifest = json.loads((bundle / MANIFEST_NAME).read_text())
            entries = {"full.onnx": manifest["full"], "cascade.onnx": manifest["cascade"], "cascade_b1.onnx": manifest["cascade_b1"]}
            entry = entries[name] if name in entries else manifest["stages"][int(name[6])]
            entry["sha256"] = sha256_file(path)
            (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))
        expected = exercise(bundle)
        if changed and not update_hash:
            assert expected == 3, "a tampered graph must be refused by its hash"
        assert cli("run", bundle, "--input", work / "x.npy", "--threads", "1") == expected
        verified = cli("verify", bundle, "--samples", "2")
        assert verified in (0, 3, 7) and (verified or not changed or update_hash)
    finally:
        shutil.rmtree(bundle.parent)


DTYPES = [np.float32, np.float64, np.float16, np.int32, np.uint8, np.bool_, np.complex64]


@pytest.fixture(scope="module")
def runner(tiny_bundle) -> CascadeRunner:
    return CascadeRunner(tiny_bundle, threads=1)


@FUZZ
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.one_of(
        st.integers(0, 5).map(lambda n: (n, 1, 16, 16)),
        st.lists(st.integers(0, 17), min_size=0, max_size=5).map(tuple),
    ),
    poison=st.sampled_from([None, np.nan, np.inf, -np.inf]),
    seed=st.integers(0, 2**16),
)
def test_random_input_arrays(runner, work, dtype, shape, poison, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    if poison is not None and x.size and x.dtype.kind in "fc":
        x.flat[rng.integers(x.size)] = poison
    valid = x.dtype == np.float32 and x.ndim == 4 and x.shape[1:] == (1, 16, 16) and len(x) > 0 and np.isfinite(x).all()
    if valid:
        result = runner.predict(x)
        assert result.predictions.shape == (len(x),)
    else:
        with pytest.raises(InputError):
            runner.predict(x)
    path = Path(tempfile.mkdtemp(prefix="fuzz-")) / "x.npy"
    try:
        np.save(path, x)
        code = cli("run", runner.manifest.root, "--input", path, "--threads", "1")
        assert code in (0, InputError.exit_code)
        if valid or (x.dtype.kind == "f" and x.ndim in (3, 4) and x.shape[-3:] == (1, 16, 16) and x.size and np.isfinite(x).all()):
            assert code == 0
    finally:
        shutil.rmtree(path.parent)
