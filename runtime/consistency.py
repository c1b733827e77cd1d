"""Torch-free bundle self-checks: the chained stages must reproduce full.onnx, cascade.onnx the chain's decisions."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edgeexit.runtime.cascade import CascadeRunner
from edgeexit.errors import VerificationError

if TYPE_CHECKING:
    from edgeexit.runtime.graph import GraphRunner

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


def check_graph_decisions(graph: GraphRunner, chain: CascadeRunner, inputs: dict[str, np.ndarray]) -> dict[str, dict]:
    """cascade.onnx must make the chain's decisions: equal predictions and exit indices for each named
    batch, run whole and one input at a time; VerificationError naming the first difference."""
    report = {}
    for kind, x in inputs.items():
        for batch in (len(x), 1):
            for start in range(0, len(x), batch):
                part = x[start : start + batch]
                got, want = graph.predict(part), chain.predict(part)
                for field in ("predictions", "exit_index"):
                    differ = np.flatnonzero(getattr(got, field) != getattr(want, field))
                    if differ.size:
                        i = int(differ[0])
                        raise VerificationError(
                            f"cascade.onnx differs from the stage chain on {kind} input {start + i} at batch {batch}: "
                            f"{field} {getattr(got, field)[i]} vs {getattr(want, field)[i]}"
                        )
        counts = chain.predict(x).exit_counts()
        report[kind] = {"samples": len(x), "batches": [len(x), 1], "exit_counts": counts}
    return report
