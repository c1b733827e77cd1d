"""Export verification: every graph against PyTorch in eval mode, and the chain against full.onnx."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from edgeexit.export.cascade_graph import check_cascades
from edgeexit.train.models import EarlyExitModel
from edgeexit.runtime.cascade import CascadeRunner
from edgeexit.errors import VerificationError
from edgeexit.runtime.datasets import digits_split
from edgeexit.runtime.preprocess import normalize
from edgeexit.runtime.manifest import load_manifest
from edgeexit.runtime.verify import TOLERANCE, check_chain, max_abs_diff


def verification_inputs(model: EarlyExitModel, count: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Random normal inputs and real digits images (normalized with the model's mean/std)."""
    shape = model.config.input_shape
    rng = np.random.default_rng(seed)
    random = rng.standard_normal((count, *shape)).astype(np.float32)
    digits, _ = digits_split("test", shape)
    real = normalize(digits[:count], model.config.mean, model.config.std)
    return {"random": random, "real": real}


@torch.no_grad()
def torch_stage_outputs(model: EarlyExitModel, x: np.ndarray) -> list[list[np.ndarray]]:
    """Per stage, the PyTorch outputs in bundle order: [features, *exit outputs], final [logits]."""
    model.eval()
    h = torch.from_numpy(x)
    stages = []
    for segment, head in zip(model.segments[:-1], model.exits):
        h = segment(h)
        stages.append([h.numpy(), *(t.numpy() for t in head(h))])
    stages.append([model.segments[-1](h).numpy()])
    return stages


def verify_bundle_against_model(bundle: Path, models: EarlyExitModel | Sequence[EarlyExitModel],
                                tolerance: float = TOLERANCE) -> dict:
    """Compare each stage and full.onnx with PyTorch, then the chain with full.onnx; raise on mismatch.

    `models`: the bundle's model, or the models of a model cascade in stage order (full.onnx is the last)."""
    models = [models] if isinstance(models, EarlyExitModel) else list(models)
    runner = CascadeRunner(bundle, device="cpu")
    report: dict[str, dict[str, float]] = {}
    for kind, x in verification_inputs(models[0]).items():
        diffs = {}
        offset = 0
        for model in models:
            expected = torch_stage_outputs(model, x)
            for position, reference in enumerate(expected):
                index = offset + position
                stage_input = x if position == 0 else expected[position - 1][0]
                got = runner.run_stage(index, stage_input)
                for name, a, b in zip(runner.output_names[index], got, reference):
                    diff = max_abs_diff(a, b)
                    diffs[name] = diff
                    if diff > tolerance:
                        raise VerificationError(f"stage_{index}.onnx output '{name}' differs from PyTorch by {diff:.2e} on {kind} inputs")
            offset += len(expected)
        with torch.no_grad():
            full_ref = models[-1].backbone.eval()(torch.from_numpy(x)).numpy()
        diffs["full"] = max_abs_diff(runner.predict_full(x), full_ref)
        if diffs["full"] > tolerance:
            raise VerificationError(f"full.onnx differs from PyTorch by {diffs['full']:.2e} on {kind} inputs")
        diffs["chain_vs_full"] = check_chain(runner, x, tolerance)
        report[kind] = {k: float(v) for k, v in diffs.items()}
    return report


def verify_cascade(bundle: Path, model: EarlyExitModel, count: int = 64) -> dict:
    """cascade.onnx and cascade_b1.onnx against the stage chain (the Python runtime) on random and real inputs, batch
    `count` and 1; the report of cascade.onnx."""
    return check_cascades(load_manifest(bundle), verification_inputs(model, count=count))
