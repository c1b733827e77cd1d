"""The Node.js client (examples/node) prints the same predictions and exits as `edgeexit run`."""
import dataclasses
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import handmade
from edgeexit.cli import main
from edgeexit.export.cascade_graph import write_cascade
from edgeexit.runtime.manifest import load_manifest
from edgeexit.runtime.bundle import save_manifest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "node"


@pytest.mark.slow
def test_node_client_matches_edgeexit_run(tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    if not (EXAMPLE / "node_modules" / "onnxruntime-node").is_dir():
        pytest.skip("onnxruntime-node is not installed: cd examples/node && npm install --ignore-scripts")
    bundle = handmade.write_bundle(tmp_path / "bundle")  # known scores: inputs leave at every exit
    manifest = load_manifest(bundle, check_hashes=False)
    save_manifest(bundle, dataclasses.replace(manifest, cascade=write_cascade(manifest)))
    x, _ = handmade.synthetic_scores(n=64)
    np.save(tmp_path / "x.npy", x)
    done = subprocess.run([node, str(EXAMPLE / "run_cascade.js"), str(bundle), str(tmp_path / "x.npy")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = CliRunner().invoke(main, ["run", str(bundle), "--engine", "chain", "--input", str(tmp_path / "x.npy")])
    assert result.exit_code == 0, result.output
    expected = [line for line in result.output.splitlines() if "\texit " in line]
    assert len(expected) == len(x)
    assert done.stdout.splitlines() == expected
    assert {line.rsplit(" ", 1)[1] for line in expected} == {"0", "1", "2"}
