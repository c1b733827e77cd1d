"""The runtime must install and import on a device without torch or onnx."""
import subprocess
import sys


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
