"""The CLI end to end through click's CliRunner, and its one-line errors."""
import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from edgeexit import cli

REPORT_KEYS = {"accuracy", "relative_macs", "exit_counts", "latency_ms", "device", "providers", "threads", "batch_size"}


def invoke(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, code, fragment):
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.output
    assert "Traceback" not in result.output


def test_train_export_run_info(tmp_path):
    model = tmp_path / "m.pt"
    result = invoke("train", "--backbone", "resnet8", "--input-size", "16", "--epochs", "2", "--exit-type", "plain",
                    "--num-exits", "1", "--placement", "linear", "--out", model)
    assert result.exit_code == 0, result.output
    assert model.is_file()
    bundle = tmp_path / "bundle"
    result = invoke("export", model, bundle)
    assert result.exit_code == 0 and "verified" in result.output, result.output
    report_path = tmp_path / "r.json"
    result = invoke("run", bundle, "--device", "cpu", "--data", "digits", "--batch-size", "8", "--json", report_path)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert REPORT_KEYS <= set(report)
    assert sum(report["exit_counts"]) == report["samples"] and len(report["exit_counts"]) == 2
    assert set(report["latency_ms"]) >= {"p50", "p95", "p99", "mean"} and report["latency_ms"]["p50"] > 0
    assert 0 < report["relative_macs"] <= 1.1 and report["providers"] == ["CPUExecutionProvider"]
    result = invoke("info", bundle)
    assert result.exit_code == 0 and "stage_1.onnx" in result.output


def test_run_on_a_torchvision_set_from_data_dir(tiny_bundle, tmp_path, fake_torchvision):
    calls = fake_torchvision("mnist")
    result = invoke("run", tiny_bundle, "--data", "mnist", "--data-dir", tmp_path, "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["samples"] == 20 and report["accuracy"] is not None
    assert calls and all(call[0] == str(tmp_path) for call in calls)
    assert_one_line_error(invoke("run", tiny_bundle, "--data", "mnist"), 2, "--data-dir")


def test_run_on_npy_input_prints_predictions(tiny_bundle, digits_test, tmp_path):
    x, y = digits_test
    np.save(tmp_path / "x.npy", x[:5])
    result = invoke("run", tiny_bundle, "--input", tmp_path / "x.npy", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["accuracy"] is None and len(report["predictions"]) == 5


@pytest.mark.parametrize(
    "args, code, fragment",
    [
        (("run", "{tmp}/missing/bundle"), 3, "bundle folder not found"),
        (("info", "{tmp}/missing/bundle"), 3, "bundle folder not found"),
        (("export", "{tmp}/missing/model.pt", "{tmp}/bundle"), 4, "model file not found"),
        (("train", "--backbone", "resnet8", "--epochs", "0", "--out", "{tmp}/m.pt"), 2, "--epochs must be >= 1"),
        (("train", "--backbone", "alexnet9", "--epochs", "1", "--out", "{tmp}/m.pt"), 2, "unknown backbone"),
        (("cuts", "--backbone", "nope"), 2, "unknown backbone 'nope'; choose from"),
    ],
)
def test_bad_arguments_get_one_line_errors(tmp_path, args, code, fragment):
    assert_one_line_error(invoke(*(a.format(tmp=tmp_path) for a in args)), code, fragment)
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing written, not even a half file


def test_bad_device_threshold_and_input(tiny_bundle, tmp_path):
    assert_one_line_error(invoke("run", tiny_bundle, "--device", "tpu"), 5, "unknown device 'tpu'")
    assert_one_line_error(invoke("run", tiny_bundle, "--threshold", "abc"), 2, "--threshold takes a number")
    assert_one_line_error(invoke("run", tiny_bundle, "--threshold", "0.5,0.5,0.5"), 2, "thresholds for")
    assert_one_line_error(invoke("run", tiny_bundle, "--input", tmp_path / "missing.png"), 4, "input not found")
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 5, 5), np.float32))
    assert_one_line_error(invoke("run", tiny_bundle, "--input", tmp_path / "bad.npy"), 4, "sample shape")


def test_missing_train_extra_is_a_one_line_hint(monkeypatch):
    import edgeexit

    monkeypatch.delitem(sys.modules, "edgeexit.workflows", raising=False)
    monkeypatch.delattr(edgeexit, "workflows", raising=False)  # else `from edgeexit import workflows` reuses it
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError(name="torch")
    result = invoke("train", "--epochs", "1")
    assert_one_line_error(result, 6, 'pip install "edgeexit[train]"')


def test_every_command_has_help_with_an_example():
    for name, command in cli.main.commands.items():
        result = invoke(name, "--help")
        assert result.exit_code == 0 and "Example" in result.output, name


def test_output_into_a_closed_pipe_stops_quietly():
    """`edgeexit cuts --backbone resnet20 | head -3`: the reader leaves early; no error line, no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "edgeexit", "cuts", "--backbone", "resnet20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line: every write meets a broken pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=600) == 141 and err == ""
