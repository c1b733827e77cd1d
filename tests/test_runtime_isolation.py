"""The runtime must install, import and run every runtime command on a device without torch or onnx."""
import json
import os
import subprocess
import sys

import pytest

from edgeexit.cli.common import DEBUG_ENV


def test_runtime_import_pulls_no_torch_or_onnx():
    code = (
        "import sys, edgeexit.runtime, edgeexit.runtime.cascade, edgeexit.runtime.datasets, edgeexit.runtime.report;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'torchvision', 'onnxsim')"
        " or m.startswith(('edgeexit.export', 'edgeexit.train.models', 'edgeexit.train.trainer')));"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"runtime imported: {out.stdout}"


def test_cli_import_is_torch_free():
    code = "import sys, edgeexit.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


BLOCKED = ("torch", "torchvision", "onnx", "onnxsim", "onnxscript", "matplotlib")
BLOCKER = f'''
"""Test harness: make the training extra's packages unimportable, as on a runtime-only device."""
import sys

BLOCKED = {BLOCKED!r}


class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: runtime-only test)", name=name)
        return None


sys.meta_path.insert(0, Blocker())
'''


@pytest.fixture(scope="module")
def runtime_only_env(tmp_path_factory) -> dict[str, str]:
    """Environment for subprocesses in which torch, torchvision, onnx, onnxsim, onnxscript and matplotlib cannot be imported."""
    folder = tmp_path_factory.mktemp("runtime-only")
    (folder / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.pop(DEBUG_ENV, None)
    for name in BLOCKED:  # the blocker itself must work, or the test below proves nothing
        probe = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, env=env)
        assert probe.returncode == 1 and "blocked: runtime-only test" in probe.stderr, probe.stderr
    return env


def edgeexit(env: dict[str, str], *args) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "edgeexit", *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
    assert "Traceback" not in result.stderr and "unexpected" not in result.stderr, result.stderr
    return result


def test_runtime_commands_run_end_to_end_without_the_training_extra(runtime_only_env, bundle_copy, tmp_path):
    env = runtime_only_env
    info = edgeexit(env, "info", bundle_copy)
    assert info.returncode == 0 and "stage_2.onnx" in info.stdout, info.stderr
    as_json = edgeexit(env, "info", bundle_copy, "--json")
    assert json.loads(as_json.stdout) == json.loads((bundle_copy / "manifest.json").read_text())

    verified = edgeexit(env, "verify", bundle_copy, "--samples", "2")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "skip onnx checker: the onnx package is not installed" in verified.stdout
    assert "ok   chain vs full.onnx" in verified.stdout

    ran = edgeexit(env, "run", bundle_copy, "--data", "digits", "--threads", "1", "--batch-size", "16", "--json", tmp_path / "run.json")
    assert ran.returncode == 0, ran.stderr
    report = json.loads((tmp_path / "run.json").read_text())
    assert report["accuracy"] > 0.5 and sum(report["exit_counts"]) == report["samples"]

    calibrated = edgeexit(env, "calibrate", bundle_copy, "--data", "digits", "--split", "val", "--budget", "0.9", "--threads", "1")
    assert calibrated.returncode == 0, calibrated.stderr
    assert "operating point" in calibrated.stdout
    assert json.loads((bundle_copy / "manifest.json").read_text())["calibration"]["objective"] == {"budget": 0.9}

    benched = edgeexit(env, "bench", bundle_copy, "--threads", "1", "--limit", "24", "--batch-size", "8", "--sweep-points", "2",
                       "--out", tmp_path / "bench")
    assert benched.returncode == 0, benched.stderr
    assert "warning: no plots" in benched.stderr and "matplotlib" in benched.stderr
    assert json.loads((tmp_path / "bench" / "bench.json").read_text())["samples"] == 24

    # and the training side says what is missing in one line, exit 6
    trained = edgeexit(env, "train", "--epochs", "1", "--out", tmp_path / "m.pt")
    assert trained.returncode == 6 and trained.stderr.strip().startswith("error: ") and "edgeexit[train]" in trained.stderr
