"""Measured evaluation of a bundle: accuracy, relative MACs, exit counts and real latency."""
from __future__ import annotations

import platform
import time
from typing import Callable, Sequence

import numpy as np

from edgeexit.runtime.cascade import CascadeResult, CascadeRunner


def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/mean in milliseconds of per-call wall times."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {
        "p50": float(np.percentile(ms, 50)),
        "p95": float(np.percentile(ms, 95)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(ms.mean()),
        "calls": int(ms.size),
    }


def batches(n: int, batch_size: int) -> list[slice]:
    """Slices covering range(n) in order, batch_size at a time."""
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def timed_calls(fn: Callable[[np.ndarray], object], x: np.ndarray, batch_size: int, warmup: int = 3) -> tuple[list, list[float]]:
    """Call fn on each batch of x, timed with a monotonic clock; warm-up calls not counted."""
    parts = batches(len(x), batch_size)
    for part in parts[: max(warmup, 0)]:
        fn(x[part])
    outputs, seconds = [], []
    for part in parts:
        start = time.perf_counter()
        out = fn(x[part])
        seconds.append(time.perf_counter() - start)
        outputs.append(out)
    return outputs, seconds


def merge_results(parts: Sequence[CascadeResult]) -> CascadeResult:
    """Concatenate per-batch cascade results in order."""
    return CascadeResult(
        np.concatenate([p.predictions for p in parts]),
        np.concatenate([p.exit_index for p in parts]),
        parts[0].num_stages,
    )


def run_report(
    runner: CascadeRunner,
    x: np.ndarray,
    labels: np.ndarray | None = None,
    batch_size: int = 1,
    warmup: int = 3,
) -> tuple[dict, CascadeResult]:
    """Run the cascade over x in batches and build the report dict of DESIGN.md."""
    parts, seconds = timed_calls(runner.predict, x, batch_size, warmup)
    result = merge_results(parts)
    report = {
        "accuracy": None if labels is None else float((result.predictions == labels).mean()),
        "relative_macs": runner.relative_macs(result),
        "exit_counts": result.exit_counts(),
        "latency_ms": latency_stats(seconds),
        "thresholds": runner.thresholds,
        "device": runner.device,
        "providers": runner.active_providers,
        "threads": runner.threads or 0,
        "batch_size": batch_size,
        "samples": int(len(x)),
        "host": platform.machine(),
    }
    return report, result


def full_report(runner: CascadeRunner, x: np.ndarray, labels: np.ndarray | None, batch_size: int = 1, warmup: int = 3) -> dict:
    """Accuracy and latency of full.onnx on the same inputs: the baseline the cascade must beat."""
    parts, seconds = timed_calls(runner.predict_full, x, batch_size, warmup)
    predictions = np.concatenate(parts).argmax(axis=1)
    return {
        "accuracy": None if labels is None else float((predictions == labels).mean()),
        "relative_macs": 1.0,
        "latency_ms": latency_stats(seconds),
    }
