"""fp32 bundle -> int8 bundle: onnxruntime static quantization (QDQ, per-channel weights) of every graph.

Calibration follows the chain: stage 0 and full.onnx see the calibration inputs, stage k
sees the features stage k-1 of the fp32 bundle produces for them, so each stage's
activation ranges are those it meets in the cascade. The exit thresholds are then chosen
again on the quantized bundle with the runtime's own calibration (runtime/calibrate.py),
by default for the relative MACs the fp32 bundle spends at its thresholds on the same
data, so fp32 and int8 compare at equal cost. Needs the `onnx` package (onnxruntime's
quantizer imports it) but not torch.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

import numpy as np

from edgeexit.errors import ConfigError
from edgeexit.extras import require
from edgeexit.export.cascade_graph import rebuild_cascade
from edgeexit.runtime.bundle import rehash, save_calibration, save_manifest, staged_bundle
from edgeexit.runtime.calibrate import Objective, calibrate
from edgeexit.runtime.cascade import CascadeRunner, check_batch
from edgeexit.runtime.files import sha256_file
from edgeexit.runtime.manifest import FP32, INT8, MANIFEST_NAME, Manifest, load_manifest

CALIBRATION_BATCH = 64
# Activation ranges come from the first RANGE_SAMPLES calibration inputs: onnxruntime's MinMax calibrator keeps
# every intermediate output of every batch until it reduces them, about 1.6 MB per 28x28 input for resnet20
# (9,000 Fashion-MNIST inputs would need ~14 GB); thresholds are still chosen on all of them.
RANGE_SAMPLES = 1024
SETTINGS = {"format": "QDQ", "activations": "uint8", "weights": "int8", "per_channel": True, "ranges": "minmax"}


def _quantization_module() -> ModuleType:
    """onnxruntime.quantization, or MissingExtraError: it imports the onnx package."""
    return require("onnxruntime.quantization", "quantize (onnxruntime's quantizer)")


def chain_inputs(runner: CascadeRunner, x: np.ndarray) -> list[np.ndarray]:
    """What each stage receives in the fp32 chain for inputs x: x itself for a stage that reads the input, else the
    previous stage's features."""
    chunks = [[stage_input for stage_input, _ in runner.stage_feeds(x[i : i + runner.chunk_size])]
              for i in range(0, len(x), runner.chunk_size)]
    return [np.concatenate(parts) for parts in zip(*chunks)]


def _batches(name: str, data: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
    for start in range(0, len(data), CALIBRATION_BATCH):
        yield {name: data[start : start + CALIBRATION_BATCH]}


def quantize_graph(source: Path, target: Path, input_name: str, data: np.ndarray) -> None:
    """Static QDQ quantization of one graph (uint8 activations, per-channel int8 weights), ranges from `data`."""
    quantization = _quantization_module()

    class Reader(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = _batches(input_name, data)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    quantization.quantize_static(
        str(source), str(target), Reader(),
        quant_format=quantization.QuantFormat.QDQ,
        per_channel=SETTINGS["per_channel"],
        activation_type=quantization.QuantType.QUInt8,
        weight_type=quantization.QuantType.QInt8,
        calibrate_method=quantization.CalibrationMethod.MinMax,
    )


def _parent_record(manifest: Manifest) -> dict:
    """How the int8 manifest names its fp32 parent: folder name and the sha256 of its manifest.json."""
    return {"name": manifest.root.resolve().name, "precision": FP32,
            "manifest_sha256": sha256_file(manifest.root / MANIFEST_NAME)}


def quantize_bundle(
    bundle: str | os.PathLike,
    out: str | os.PathLike,
    x: np.ndarray,
    labels: np.ndarray,
    objective: Objective | None = None,
    data: dict | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> Manifest:
    """Write an int8 copy of an fp32 bundle to `out` (atomically) with thresholds re-calibrated; returns its manifest.

    x (float32, normalized, shaped like the bundle's input) calibrates the activation ranges
    and, with labels, the thresholds; objective defaults to the fp32 bundle's relative MACs on x (class exclusion:
    its accuracy drop on x, since beta is searched for a tolerance).
    """
    parent = load_manifest(bundle)
    if parent.precision != FP32:
        raise ConfigError(f"{bundle} is already an {parent.precision} bundle (quantized from "
                          f"'{parent.quantization['parent']['name']}'); quantize its fp32 parent instead")
    x = check_batch(x, parent.input_shape)
    if len(x) != len(labels):
        raise ConfigError(f"calibration data has {len(x)} inputs but {len(labels)} labels")
    _quantization_module()
    fp32 = CascadeRunner(parent)
    if objective is None:
        result = fp32.predict(x)
        if any(e.policy.kind == "exclusion" for e in parent.exits):  # beta is searched for an accuracy tolerance
            full = (fp32.predict_full(x).argmax(axis=1) == labels).mean()
            objective = ("target_drop", max(0.0, float(full - (result.predictions == labels).mean()) * 100))
        else:
            objective = ("budget", fp32.relative_macs(result))
    ranged = x[:RANGE_SAMPLES]
    progress(f"running the fp32 chain over {len(ranged)} calibration inputs for the activation ranges")
    inputs = chain_inputs(fp32, ranged)
    with staged_bundle(out, progress) as staged:
        # the int8 records: the parent's, with no cascade.onnx (rebuilt below from the int8 stages and the
        # re-chosen thresholds) and no calibration (chosen again below)
        manifest = dataclasses.replace(parent, root=staged, cascade=None, cascade_b1=None, calibration=None, precision=INT8,
                                       quantization={**SETTINGS, "parent": _parent_record(parent),
                                                     "data": {**(data or {}), "samples": int(len(x)),
                                                              "range_samples": int(len(ranged))}})
        graphs = [*((stage.file, stage.inputs[0].name, stage_input) for stage, stage_input in zip(parent.stages, inputs)),
                  (parent.full.file, parent.input_spec.name, ranged)]
        for file, input_name, stage_input in graphs:
            progress(f"quantizing {file}")
            quantize_graph(parent.path(file), staged / file, input_name, stage_input)
            manifest = rehash(manifest, file)
        save_manifest(staged, manifest)
        if not manifest.exits:  # a static network: nothing to calibrate, no cascade graph
            return dataclasses.replace(manifest, root=Path(out).resolve())
        progress("re-calibrating the thresholds on the int8 bundle")
        save_calibration(staged, calibrate(CascadeRunner(staged), x, labels, objective, data, progress))
        progress("building cascade.onnx from the int8 stages")
        manifest = rebuild_cascade(staged, x)
    return dataclasses.replace(manifest, root=Path(out).resolve())
