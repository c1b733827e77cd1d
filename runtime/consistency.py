"""Torch-free bundle self-check: the chained stages must reproduce full.onnx."""
from __future__ import annotations

import numpy as np

from edgeexit.runtime.cascade import CascadeRunner
from edgeexit.errors import VerificationError

TOLERANCE = 1e-4


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute elementwise difference, scaled down for large-magnitude tensors."""
    scale = max(1.0, float(np.abs(b).max()) if b.size else 1.0)
    return float(np.abs(a - b).max()) / scale if a.size else 0.0


def check_chain(runner: CascadeRunner, x: np.ndarray, tolerance: float = TOLERANCE) -> float:
    """Run every stage in sequence and compare the final logits with full.onnx; return the diff."""
    _, chained = runner.stage_outputs(x)
    full = runner.predict_full(x)
    diff = max_abs_diff(chained, full)
    if diff > tolerance:
        raise VerificationError(f"chained stages differ from full.onnx by {diff:.2e} (> {tolerance:.0e})")
    return diff
