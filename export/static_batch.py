"""Bundle -> static-batch bundle: every graph rewritten with a fixed batch dim, for mobile NPUs.

NNAPI (Android) and CoreML (iOS) take no node whose input has a symbolic dim: onnxruntime's
mobile usability checker gives them 0 of a stage's nodes as exported and all of them once
the batch is fixed. The runtime runs such a bundle in groups of N inputs (the last group
zero-padded), so the cascade still works on survivors; a static batch of 1 also gets the batch-1
cascade.onnx (an If per exit, fixed shapes). Needs the `onnx` package, not torch.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from types import ModuleType
from typing import Callable

import numpy as np

from edgeexit.errors import ConfigError, VerificationError
from edgeexit.extras import require
from edgeexit.export.cascade_graph import rebuild_cascade
from edgeexit.runtime.bundle import rehash, save_manifest, staged_bundle, with_static_batch
from edgeexit.runtime.cascade import CascadeRunner
from edgeexit.runtime.manifest import BATCH_DIM, Manifest, load_manifest

TOLERANCE = 1e-5  # same graphs, same kernels: only the batch dim changed


def _onnx() -> ModuleType:
    """The onnx package, or MissingExtraError naming the extra."""
    return require("onnx", "static-batch (it rewrites graphs)")


def fix_graph(source: Path, target: Path, batch: int) -> None:
    """Write `source` with its symbolic batch dim (named by the first input) set to `batch` everywhere."""
    onnx = _onnx()
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_dim_param_fixed

    model = onnx.load(str(source))
    dim_name = model.graph.input[0].type.tensor_type.shape.dim[0].dim_param or BATCH_DIM
    make_dim_param_fixed(model.graph, dim_name, batch)
    fix_output_shapes(model)
    onnx.save(model, str(target))


def static_batch_bundle(
    bundle: str | os.PathLike,
    out: str | os.PathLike,
    batch: int,
    progress: Callable[[str], None] = lambda message: None,
) -> Manifest:
    """Write a copy of `bundle` whose graphs take exactly `batch` inputs, checked against the original; returns its manifest."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"--batch must be a positive int, got {batch!r}")
    parent = load_manifest(bundle)
    if parent.static_batch is not None:
        raise ConfigError(f"{bundle} already has the static batch {parent.static_batch}; fix the batch of its "
                          f"symbolic-batch original instead")
    with staged_bundle(out, progress) as staged:
        # no cascade graphs: rebuilt below, the batch-1 graph as cascade.onnx for a static batch of 1, none above
        manifest = with_static_batch(dataclasses.replace(parent, root=staged, cascade=None, cascade_b1=None), batch)
        for file in [*(stage.file for stage in parent.stages), parent.full.file]:
            progress(f"fixing the batch of {file} to {batch}")
            fix_graph(parent.path(file), staged / file, batch)
            manifest = rehash(manifest, file)
        fixed = save_manifest(staged, manifest)
        check_same_outputs(CascadeRunner(parent), CascadeRunner(fixed), batch)
        if batch == 1:
            progress("building the batch-1 cascade.onnx")
            x = np.random.default_rng(0).standard_normal((32, *parent.input_shape)).astype(np.float32)
            fixed = rebuild_cascade(staged, x)
    return dataclasses.replace(fixed, root=Path(out).resolve())


def check_same_outputs(original: CascadeRunner, fixed: CascadeRunner, batch: int, seed: int = 0) -> float:
    """VerificationError unless the fixed bundle's exit outputs and logits match the original's; returns the diff."""
    x = np.random.default_rng(seed).standard_normal((batch + 1, *original.manifest.input_shape)).astype(np.float32)
    (exits_a, logits_a), (exits_b, logits_b) = original.stage_outputs(x), fixed.stage_outputs(x)
    pairs = [(logits_a, logits_b), *((a[role], b[role]) for a, b in zip(exits_a, exits_b) for role in a)]
    diff = max(float(np.abs(a - b).max()) for a, b in pairs)
    if diff > TOLERANCE:
        raise VerificationError(f"static-batch graphs differ from the originals by {diff:.2e} (> {TOLERANCE:.0e})")
    return diff
