"""The README's command-line promises, each with a test that fails when the promise breaks: demo, pretrain,
exit code 1 and EDGEEXIT_DEBUG, 130 on Ctrl-C, providers, export targets, memory-mapped .npy, image folders, info --json."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from PIL import Image

from edgeexit.cli import main
from edgeexit.cli.common import DEBUG_ENV
from edgeexit.runtime import BundleError, CascadeRunner, DeviceError
from edgeexit.runtime.providers import CPU, CUDA, TENSORRT, resolve_providers
from edgeexit.runtime.manifest import load_manifest


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def test_demo_trains_exports_runs_and_prints_the_table(tmp_path, monkeypatch):
    """The demo's whole path on a small configuration (the README's full demo is the slow test below)."""
    from edgeexit import workflows

    monkeypatch.setattr(workflows, "DEMO_TRAINING", dataclasses.replace(workflows.DEMO_TRAINING, backbone="resnet8", input_size=16))
    result = invoke("demo", "--out", tmp_path / "demo", "--epochs", "1")
    check_demo(result, tmp_path / "demo")


def check_demo(result, out: Path) -> None:
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["model", "accuracy", "rel.", "MACs", "exits", "p50", "ms", "p95", "ms"]
    rows = {line[:18].split()[0]: line[18:].split() for line in lines[1:4]}  # model name, then the columns
    assert set(rows) == {"full.onnx", "cascade", "calibrated"}
    report = json.loads((out / "report.json").read_text())
    assert float(rows["cascade"][0]) == pytest.approx(report["accuracy"], abs=1e-4)
    calibrated = report["calibrated"]  # thresholds chosen on val for a 0.5-point drop, written into the bundle
    assert float(rows["calibrated"][0]) == pytest.approx(calibrated["accuracy"], abs=1e-4)
    assert calibrated["target_drop"] == 0.5
    assert calibrated["thresholds"] == pytest.approx(load_manifest(out / "bundle").calibration["chosen"]["thresholds"])
    assert lines[4].startswith("calibrated: thresholds ") and "0.5 points below" in lines[4]
    assert float(rows["full.onnx"][0]) == pytest.approx(report["full_onnx"]["accuracy"], abs=1e-4)
    assert float(rows["cascade"][1]) == pytest.approx(report["relative_macs"], abs=1e-3)
    assert rows["cascade"][2] == "/".join(map(str, report["exit_counts"]))
    assert sum(report["exit_counts"]) == report["samples"] > 100
    assert (out / "model.pt").is_file() and CascadeRunner(out / "bundle").num_exits == 2
    assert lines[-1] == f"wrote {out}/model.pt, {out}/bundle/, {out}/report.json"


@pytest.mark.slow
def test_readme_demo_as_documented(tmp_path):
    """`edgeexit demo --out demo/` with its defaults (resnet20, 8 epochs): about a minute on 2 cores."""
    check_demo(invoke("demo", "--out", tmp_path / "demo"), tmp_path / "demo")


def test_pretrain_writes_weights_that_train_loads(tmp_path):
    from edgeexit.train.backbones import build_backbone
    from edgeexit.train.pretrained import load_backbone_weights

    out = tmp_path / "backbone.pt"
    result = invoke("pretrain", "--backbone", "resnet8", "--input-size", "8", "--epochs", "1", "--out", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1].startswith(f"wrote {out}: val accuracy ")
    net = build_backbone("resnet8", 10, 1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    load_backbone_weights(net, out)  # strict: every key and shape must match
    assert any((before[k] != v).any() for k, v in net.state_dict().items())
    info = invoke("info", out)
    assert info.exit_code == 0 and "recipe: sgd lr 0.05, weight decay 0.0005, one-cycle schedule" in info.output  # the lr that ran
    assert one_error_line(invoke("pretrain", "--backbone", "resnet8", "--epochs", "0", "--out", out), 2)


def cli_with(command: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    """`edgeexit COMMAND` in a subprocess, with COMMAND (Python defining `def command()`) added to the real group."""
    code = (f"import sys, time\nfrom edgeexit.cli import main\n{command}\nmain.command('probe')(command)\n"
            f"sys.argv = ['edgeexit', 'probe', *{list(args)!r}]\nmain()\n")
    # SIGINT back to its default: a shell starts background jobs (`pytest ... &`) with it ignored, children
    # inherit that, and Python then installs no KeyboardInterrupt handler, so a Ctrl-C test would hang
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **(env or {})}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


BOOM = """
def command():
    raise ZeroDivisionError("boom\\nsecond line")
"""


@pytest.mark.parametrize("debug", [False, True])
def test_unexpected_errors_exit_1_with_a_traceback_only_in_debug(debug):
    proc = cli_with(BOOM, env={DEBUG_ENV: "1" if debug else ""})
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    if debug:
        assert "Traceback (most recent call last)" in stderr and "ZeroDivisionError: boom" in stderr
    else:
        assert stderr.strip().splitlines() == [f"error: unexpected ZeroDivisionError: boom (set {DEBUG_ENV}=1 for details)"]


SLEEP = """
def command():
    print("ready", flush=True)
    time.sleep(120)
"""


def test_ctrl_c_exits_130_in_one_line():
    proc = cli_with(SLEEP, env={DEBUG_ENV: ""})
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130 and stderr.strip() == "interrupted", stderr


@pytest.mark.parametrize("device, needs", [("cuda", CUDA), ("tensorrt", TENSORRT), ("jetson", TENSORRT)])
def test_unavailable_provider_is_a_one_line_error_listing_what_exists(tiny_bundle, monkeypatch, device, needs):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU, "AzureExecutionProvider"])
    line = one_error_line(invoke("run", tiny_bundle, "--device", device, "--threads", "1"), DeviceError.exit_code)
    assert line == (f"error: device '{device}' needs {needs}, which this onnxruntime does not have; "
                    f"available providers: {CPU}, AzureExecutionProvider")


@pytest.mark.parametrize("device", ["tensorrt", "jetson"])
def test_tensorrt_comes_first_then_cuda_then_cpu_with_the_engine_cache(tmp_path, monkeypatch, device):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU, CUDA, TENSORRT])
    cache = tmp_path / "bundle" / "cache"
    providers = resolve_providers(device, cache_dir=cache)
    assert providers == [(TENSORRT, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)}), CUDA, CPU]
    assert cache.is_dir()
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU, TENSORRT])  # no CUDA: TensorRT, then CPU
    assert [p if isinstance(p, str) else p[0] for p in resolve_providers(device, cache_dir=cache)] == [TENSORRT, CPU]
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU, CUDA])
    assert resolve_providers("cuda") == [CUDA, CPU] and resolve_providers("cpu") == [CPU]


def test_the_runner_keeps_engines_in_the_bundle_cache_folder(tiny_bundle, monkeypatch):
    from edgeexit.runtime import cascade

    seen = []
    real = cascade.resolve_providers
    monkeypatch.setattr(cascade, "resolve_providers", lambda device, cache_dir=None: seen.append(cache_dir) or real(device, cache_dir))
    CascadeRunner(tiny_bundle, device="cpu")
    assert seen == [Path(tiny_bundle) / "cache"]


@pytest.mark.parametrize("target", ["folder", "file"])
def test_export_refuses_to_overwrite_what_is_not_a_bundle(tiny_model_path, tmp_path, target):
    out = tmp_path / "out"
    if target == "folder":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    else:
        out.write_text("mine")
    line = one_error_line(invoke("export", tiny_model_path, out), BundleError.exit_code)
    assert line.startswith(f"error: refusing to overwrite {out}")
    assert (out / "notes.txt" if target == "folder" else out).read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folder left beside it


def test_float32_npy_is_memory_mapped_and_memory_stays_bounded(tiny_bundle, tmp_path):
    """A 24 MB float32 .npy through load_input and the run report: Python/numpy allocations stay far below the file."""
    from edgeexit.runtime.datasets import load_input
    from edgeexit.runtime.report import run_report

    runner = CascadeRunner(tiny_bundle, threads=1)
    n = 24 * 1024
    data = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float32, shape=(n, *runner.manifest.input_shape))
    data[:] = np.random.default_rng(0).standard_normal(data.shape[1:], dtype=np.float32)
    data.flush()
    del data
    size = (tmp_path / "big.npy").stat().st_size
    tracemalloc.start()
    try:
        x, names = load_input(tmp_path / "big.npy", runner.manifest.input_spec)
        assert isinstance(x.base, np.memmap) or isinstance(x, np.memmap), "the .npy was read into memory"
        report, result = run_report(runner, x, None, batch_size=512)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(result.predictions) == n == len(names)
    assert peak < size / 4, f"peak Python/numpy allocation {peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB file"


def test_a_folder_of_images_is_read_in_name_order(tiny_bundle, digits_test, tmp_path):
    """Digits written as PNGs under shuffled names: predictions come back in sorted-name order and are right."""
    from edgeexit.runtime.datasets import digits_split

    spec = CascadeRunner(tiny_bundle).manifest.input_spec
    images, labels = digits_split("test", spec.sample_shape)
    images, labels = images[:40], labels[:40]
    order = np.random.default_rng(0).permutation(len(images))
    folder = tmp_path / "images"
    folder.mkdir()
    for rank, i in enumerate(order):
        Image.fromarray((images[i, 0] * 255).round().astype(np.uint8)).save(folder / f"img_{rank:03d}.png")
    (folder / "notes.txt").write_text("not an image: ignored")
    result = invoke("run", tiny_bundle, "--input", folder, "--threads", "1", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    predictions = np.array(json.loads((tmp_path / "r.json").read_text())["predictions"])
    assert len(predictions) == len(images)
    assert (predictions == labels[order]).mean() >= 0.8  # the same model gets >= 0.8 on digits in any order
    expected = CascadeRunner(tiny_bundle, threads=1).predict(digits_test[0][:40][order]).predictions
    assert (predictions == expected).mean() >= 0.9  # PNG rounding may flip a borderline digit, not the order


def test_info_json_is_the_manifest(tiny_bundle):
    result = invoke("info", tiny_bundle, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads((tiny_bundle / "manifest.json").read_text())
