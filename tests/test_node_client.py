"""The Node.js client (examples/node) prints the same predictions and exits as `edgeexit run`."""
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgeexit.cli import main

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "node"


@pytest.mark.slow
def test_node_client_matches_edgeexit_run(tiny_bundle, digits_test, tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    if not (EXAMPLE / "node_modules" / "onnxruntime-node").is_dir():
        pytest.skip("onnxruntime-node is not installed: cd examples/node && npm install --ignore-scripts")
    x = np.concatenate([digits_test[0][:40], np.random.default_rng(1).standard_normal((24, *digits_test[0].shape[1:])).astype(np.float32)])
    np.save(tmp_path / "x.npy", x)
    done = subprocess.run([node, str(EXAMPLE / "run_cascade.js"), str(tiny_bundle), str(tmp_path / "x.npy")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = CliRunner().invoke(main, ["run", str(tiny_bundle), "--engine", "chain", "--input", str(tmp_path / "x.npy")])
    assert result.exit_code == 0, result.output
    expected = [line for line in result.output.splitlines() if "\texit " in line]
    assert len(expected) == len(x)
    assert done.stdout.splitlines() == expected
    assert len({line.rsplit(" ", 1)[1] for line in expected}) > 1, "inputs should leave at more than one exit"
