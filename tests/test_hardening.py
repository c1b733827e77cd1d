"""Bad inputs, unsafe checkpoints, `edgeexit verify`, and atomic export under failures and kills."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgeexit.cli import main
from edgeexit.runtime import CascadeRunner, InputError
from edgeexit.errors import BundleError, VerificationError

INPUT_EXIT = InputError.exit_code


def cli(*args: str):
    """Run the CLI in-process; every failure must be one `error:` line, never a traceback."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output and "unexpected" not in result.output, result.output
    return result


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(out: Path) -> list[str]:
    """Hidden temp folders an export left beside `out`."""
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def _npy(array):
    def make(tmp: Path) -> Path:
        np.save(tmp / "x.npy", array)
        return tmp / "x.npy"

    return make


def _file(name: str, content: bytes):
    def make(tmp: Path) -> Path:
        (tmp / name).write_bytes(content)
        return tmp / name

    return make


def _png(size: tuple[int, int], mode: str = "L"):
    def make(tmp: Path) -> Path:
        from PIL import Image

        Image.new(mode, size, 128).save(tmp / "x.png")
        return tmp / "x.png"

    return make


def _folder_with_bad_image(tmp: Path) -> Path:
    _png((16, 16))(tmp)
    (tmp / "y.png").write_bytes(b"\x89PNG truncated")
    return tmp


GOOD = np.zeros((3, 1, 16, 16), np.float32)
NAN = GOOD.copy()
NAN[2, 0, 3, 3] = np.nan
INF = GOOD.copy()
INF[1, 0, 0, 0] = np.inf

# (case, make input file, expected exit code, fragment of the message)
CLI_INPUTS = [
    ("float32 NCHW", _npy(GOOD), 0, "exit"),
    ("float32 CHW (one sample)", _npy(GOOD[0]), 0, "exit"),
    ("float64 (cast)", _npy(GOOD.astype(np.float64)), 0, "exit"),
    ("uint8 raw images NHW", _npy(np.zeros((2, 20, 20), np.uint8)), 0, "exit"),
    ("png of another size", _png((40, 30)), 0, "exit"),
    ("rgb png for a gray model", _png((16, 16), "RGB"), 0, "exit"),
    ("rank 2", _npy(np.zeros((16, 16), np.float32)), INPUT_EXIT, "got shape (16, 16)"),
    ("rank 5", _npy(np.zeros((1, 1, 1, 16, 16), np.float32)), INPUT_EXIT, "got shape (1, 1, 1, 16, 16)"),
    ("wrong spatial shape", _npy(np.zeros((2, 1, 8, 8), np.float32)), INPUT_EXIT, "got (1, 8, 8)"),
    ("3 channels for a 1-channel model", _npy(np.zeros((2, 3, 16, 16), np.float32)), INPUT_EXIT, "got (3, 16, 16)"),
    ("uint8 NHWC with 3 channels", _npy(np.zeros((2, 16, 16, 3), np.uint8)), INPUT_EXIT, "must be (N, H, W[, 1])"),
    ("int32", _npy(np.zeros((2, 1, 16, 16), np.int32)), INPUT_EXIT, "dtype int32"),
    ("bool", _npy(np.zeros((2, 1, 16, 16), bool)), INPUT_EXIT, "dtype bool"),
    ("NaN", _npy(NAN), INPUT_EXIT, "sample 2 contains NaN"),
    ("inf", _npy(INF), INPUT_EXIT, "sample 1 contains NaN or infinite"),
    ("empty batch", _npy(np.zeros((0, 1, 16, 16), np.float32)), INPUT_EXIT, "batch is empty"),
    ("object array", _npy(np.array([{}, 1], dtype=object)), INPUT_EXIT, "cannot read"),
    ("truncated .npy", _file("x.npy", np.lib.format.magic(1, 0) + b"{'descr'"), INPUT_EXIT, "cannot read"),
    ("garbage .png", _file("x.png", b"not an image"), INPUT_EXIT, "cannot read image"),
    ("folder with a bad image", _folder_with_bad_image, INPUT_EXIT, "y.png"),
    ("empty folder", lambda tmp: tmp, INPUT_EXIT, "no image files"),
    ("unsupported suffix", _file("x.txt", b"1 2 3"), INPUT_EXIT, "unsupported input"),
    ("missing file", lambda tmp: tmp / "nope.npy", INPUT_EXIT, "input not found"),
]


@pytest.mark.parametrize("case, make, code, fragment", CLI_INPUTS, ids=[c[0] for c in CLI_INPUTS])
def test_cli_inputs_work_or_fail_in_one_line(tiny_bundle, tmp_path, case, make, code, fragment):
    result = cli("run", tiny_bundle, "--input", make(tmp_path), "--threads", "1")
    assert result.exit_code == code, result.output
    assert fragment in result.output
    if code:
        assert result.output.strip().count("\n") == 0 and result.output.startswith("error: ")


@pytest.fixture(scope="module")
def runner(tiny_bundle) -> CascadeRunner:
    return CascadeRunner(tiny_bundle, threads=1)


API_INPUTS = [
    ("list", GOOD.tolist(), "numpy array"),
    ("float64", GOOD.astype(np.float64), "dtype must be float32"),
    ("rank 3", GOOD[0], "got rank 3"),
    ("channels", np.zeros((1, 3, 16, 16), np.float32), "got (3, 16, 16)"),
    ("empty", GOOD[:0], "empty"),
    ("NaN", NAN, "sample 2"),
]


@pytest.mark.parametrize("case, x, fragment", API_INPUTS, ids=[c[0] for c in API_INPUTS])
def test_api_rejects_bad_batches_with_input_error(runner, case, x, fragment):
    for call in (runner.predict, runner.predict_full, runner.stage_outputs):
        with pytest.raises(InputError, match=re.escape(fragment)):
            call(x)


def test_huge_batch_runs_in_bounded_chunks(tiny_bundle, digits_test):
    x = np.concatenate([digits_test[0]] * 4)
    runner = CascadeRunner(tiny_bundle, threads=1, chunk_size=64, thresholds=0.0)
    sizes: list[int] = []
    run_stage = runner.run_stage
    runner.run_stage = lambda i, features: sizes.append(len(features)) or run_stage(i, features)
    result = runner.predict(x)
    assert max(sizes) == 64 and len(result.predictions) == len(x)
    pieces = [CascadeRunner(tiny_bundle, threads=1, thresholds=0.0).predict(x[i : i + 100]) for i in range(0, len(x), 100)]
    np.testing.assert_array_equal(result.predictions, np.concatenate([p.predictions for p in pieces]))


def _evil_torch_save(path: Path, marker: Path) -> None:
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": "edgeexit-model", "version": 1, "config": {}, "state_dict": {}, "x": Evil()}, path)


@pytest.mark.parametrize("pickler", ["torch.save", "pickle"])
def test_checkpoint_with_code_is_refused_and_never_runs(tmp_path, pickler):
    import pickle

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    if pickler == "pickle":
        evil.write_bytes(pickle.dumps({"x": type("Evil", (), {"__reduce__": lambda s: (os.system, (f"touch {marker}",))})()}))
    else:
        _evil_torch_save(evil, marker)
    result = cli("export", evil, tmp_path / "out")
    assert result.exit_code == INPUT_EXIT
    assert "refusing to load" in result.output and "safe weights-only loader rejected it" in result.output
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_verify_passes_a_good_bundle(tiny_bundle):
    result = cli("verify", tiny_bundle, "--samples", "4")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert sum(line.startswith("ok   sha256") for line in lines) == 6  # 3 stages, full.onnx, cascade.onnx, cascade_b1.onnx
    assert any(line.startswith("ok   onnx checker stage_0.onnx") for line in lines)
    assert any(line.startswith("ok   chain vs full.onnx") for line in lines)
    assert any(line.startswith("ok   cascade.onnx vs chain decisions") for line in lines)
    assert any(line.startswith("ok   cascade_b1.onnx vs chain decisions") for line in lines)


def test_verify_without_onnx_skips_the_checker(tiny_bundle, monkeypatch):
    from edgeexit.runtime import verify

    monkeypatch.setattr(verify, "_optional_onnx", lambda: None)
    result = cli("verify", tiny_bundle, "--samples", "2")
    assert result.exit_code == 0 and "skip onnx checker: the onnx package is not installed" in result.output


def test_verify_fails_a_tampered_bundle(bundle_copy):
    data = bytearray((bundle_copy / "stage_0.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle_copy / "stage_0.onnx").write_bytes(bytes(data))
    result = cli("verify", bundle_copy)
    assert result.exit_code == VerificationError.exit_code
    assert "FAIL sha256 stage_0.onnx" in result.output and "ok   sha256 stage_1.onnx" in result.output


def test_verify_refuses_an_invalid_manifest(bundle_copy):
    (bundle_copy / "manifest.json").write_text("{}")
    result = cli("verify", bundle_copy)
    assert result.exit_code == BundleError.exit_code and "invalid manifest" in result.output


def _fail_second_graph(export_graph):
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected exporter crash")
        return export_graph(*args, **kwargs)

    return wrapper


def test_failed_export_keeps_the_earlier_bundle(tiny_model_path, bundle_copy, monkeypatch):
    from edgeexit.export import exporter

    before = snapshot(bundle_copy)
    monkeypatch.setattr(exporter, "export_graph", _fail_second_graph(exporter.export_graph))
    with pytest.raises(RuntimeError, match="injected"):
        exporter.export_bundle(tiny_model_path, bundle_copy)
    assert snapshot(bundle_copy) == before and leftovers(bundle_copy) == []


def test_failed_final_rename_restores_the_earlier_bundle(tiny_model_path, bundle_copy, monkeypatch):
    from edgeexit.export import exporter

    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".bundle.tmp-") and Path(dst) == bundle_copy.resolve():
            raise OSError("injected rename failure")
        return real_replace(src, dst)

    before = snapshot(bundle_copy)
    monkeypatch.setattr(exporter.os, "replace", replace)
    with pytest.raises(OSError, match="injected"):
        exporter.export_bundle(tiny_model_path, bundle_copy, verify=False)
    assert snapshot(bundle_copy) == before and leftovers(bundle_copy) == []


def test_killed_export_keeps_the_earlier_bundle_and_its_temp_dir_is_cleaned(tiny_model_path, bundle_copy):
    from edgeexit.runtime.bundle import clean_stale

    before = snapshot(bundle_copy)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeexit", "export", str(tiny_model_path), str(bundle_copy)],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    try:
        for line in proc.stderr:
            if "exporting stage_1.onnx" in line:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "export finished before it could be killed"
    assert snapshot(bundle_copy) == before
    stale = leftovers(bundle_copy)
    assert len(stale) == 1 and stale[0].startswith(f".bundle.tmp-{proc.pid}-")
    assert [p.name for p in clean_stale(bundle_copy.resolve())] == stale
    assert leftovers(bundle_copy) == [] and snapshot(bundle_copy) == before


def test_bundle_moved_aside_by_a_kill_is_put_back(bundle_copy):
    from edgeexit.runtime.bundle import clean_stale

    dead_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1 if Path("/proc/sys/kernel/pid_max").is_file() else 2**31 - 1
    before = snapshot(bundle_copy)
    aside = bundle_copy.parent / f".bundle.old-{dead_pid}-abc"  # a PID above pid_max: no process has it, ever
    aside.mkdir()
    shutil.move(str(bundle_copy), aside / "bundle")
    (bundle_copy.parent / f".bundle.tmp-{os.getpid()}-live").mkdir()  # a live export's folder stays
    clean_stale(bundle_copy)
    assert snapshot(bundle_copy) == before
    assert leftovers(bundle_copy) == [f".bundle.tmp-{os.getpid()}-live"]
