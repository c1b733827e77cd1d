"""Measured evaluation of a bundle: accuracy, relative MACs, exit counts and real latency.

`run`, `demo` and `bench` all time through `interleaved_timings` and describe results
with the same entries, so their reports agree key for key.
"""
from __future__ import annotations

import platform
import time
from typing import Callable, Sequence

import numpy as np

from edgeexit.runtime.cascade import CascadeResult, Runner
from edgeexit.runtime.drift import DriftGuard, GuardSettings, drift_entry
from edgeexit.runtime.latency import latency_prediction, matching_profile

Progress = Callable[[str], None]


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


def interleaved_timings(fns: dict[str, Callable[[np.ndarray], object]], x: np.ndarray, batch_size: int,
                        warmup: int = 3, progress: Progress = lambda m: None,
                        label: str = "timing") -> dict[str, tuple[list, list[float]]]:
    """Time every fn on each batch of x with a monotonic clock, rotating their order per batch
    so drift and noise hit all alike; the first `warmup` batches are run once untimed."""
    parts = batches(len(x), batch_size)
    names = list(fns)
    for part in parts[: max(warmup, 0)]:
        for name in names:
            fns[name](x[part])
    results: dict[str, tuple[list, list[float]]] = {name: ([], []) for name in names}
    step = max(1, len(parts) // 10)
    for i, part in enumerate(parts):
        batch = x[part]
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            start = time.perf_counter()
            out = fns[name](batch)
            elapsed = time.perf_counter() - start
            results[name][0].append(out)
            results[name][1].append(elapsed)
        if (i + 1) % step == 0 or i + 1 == len(parts):
            progress(f"{label}: {i + 1}/{len(parts)} batches")
    return results


def merge_results(parts: Sequence[CascadeResult]) -> CascadeResult:
    """Concatenate per-batch cascade results in order."""
    return CascadeResult(
        np.concatenate([p.predictions for p in parts]),
        np.concatenate([p.exit_index for p in parts]),
        parts[0].num_stages,
    )


def accuracy(predictions: np.ndarray, labels: np.ndarray | None) -> float | None:
    return None if labels is None else float((predictions == labels).mean())


def timing_entry(seconds: Sequence[float], samples: int) -> dict:
    """Latency percentiles per call plus throughput in inputs per second."""
    total = float(np.sum(seconds))
    return {"latency_ms": latency_stats(seconds), "throughput_per_s": samples / total if total > 0 else None}


def logits_entry(parts: Sequence[np.ndarray], seconds: Sequence[float], labels: np.ndarray | None) -> dict:
    """Accuracy and latency of a no-exit model (full.onnx, PyTorch eager) from its per-batch logits."""
    predictions = np.concatenate(parts).argmax(axis=1)
    return {"accuracy": accuracy(predictions, labels), "relative_macs": 1.0, **timing_entry(seconds, len(predictions))}


def cascade_entry(runner: Runner, parts: Sequence[CascadeResult], seconds: Sequence[float],
                  labels: np.ndarray | None, thresholds: Sequence[float] | None = None) -> dict:
    """Accuracy, MACs, exits and latency of a cascade run (at `thresholds`, default the runner's), with
    latency grouped by the deepest exit per call.

    When the bundle has a device profile for this host, device, threads and batch size, the
    entry carries the latency it predicts for this run's exit histogram beside the measured one
    (`predicted_latency_ms` / `measured_latency_ms`: mean ms per input)."""
    result = merge_results(parts)
    profile = matching_profile(runner.manifest, runner.device, runner.threads, len(parts[0].predictions), runner.engine)
    expected = None if profile is None else latency_prediction(profile, result.exit_counts())
    deepest = np.array([p.exit_index.max() for p in parts])
    per_exit = {}
    for index in range(result.num_stages):
        calls = np.asarray(seconds)[deepest == index]
        per_exit[str(index)] = latency_stats(calls) if calls.size else None
    return {
        "accuracy": accuracy(result.predictions, labels),
        "relative_macs": runner.relative_macs(result),
        "predicted_latency_ms": None if expected is None else expected["mean_per_input_ms"],
        "measured_latency_ms": float(np.sum(seconds)) * 1e3 / len(result.predictions),
        "expected_latency": expected,
        "exit_counts": result.exit_counts(),
        "thresholds": runner.thresholds if thresholds is None else list(thresholds),
        **timing_entry(seconds, len(result.predictions)),
        "latency_by_exit_ms": per_exit,
    }


def runner_info(runner: Runner, batch_size: int, samples: int) -> dict:
    """Where and how a report was measured."""
    return {
        "device": runner.device,
        "engine": runner.engine,
        "providers": runner.active_providers,
        "threads": runner.threads or 0,
        "batch_size": batch_size,
        "samples": int(samples),
        "host": platform.machine(),
    }


def run_report(
    runner: Runner,
    x: np.ndarray,
    labels: np.ndarray | None = None,
    batch_size: int = 1,
    warmup: int = 3,
    guard: GuardSettings | None = None,
) -> tuple[dict, CascadeResult]:
    """Run the cascade over x in batches and build the run report (the entries `run --json` writes).

    `drift`: the run's exit shares against the calibration's (drift.drift_entry). With `guard`, every call goes
    through a drift.DriftGuard (warm-up calls bypass it) and `guard` reports what it saw and did."""
    if guard is None or guard.mode == "off":
        parts, seconds = interleaved_timings({"cascade": runner.predict}, x, batch_size, warmup)["cascade"]
        watched = {}
    else:
        for part in batches(len(x), batch_size)[: max(warmup, 0)]:
            runner.predict(x[part])
        watcher = DriftGuard(runner, guard)
        parts, seconds = interleaved_timings({"cascade": watcher.predict}, x, batch_size, warmup=0)["cascade"]
        watcher.close()
        watched = {"guard": watcher.report()}
    result = merge_results(parts)
    return {**cascade_entry(runner, parts, seconds, labels), **runner_info(runner, batch_size, len(x)),
            "drift": drift_entry(runner, result.exit_index), **watched}, result


def full_report(runner: Runner, x: np.ndarray, labels: np.ndarray | None, batch_size: int = 1, warmup: int = 3) -> dict:
    """Accuracy and latency of full.onnx on the same inputs: the baseline the cascade must beat."""
    parts, seconds = interleaved_timings({"full": runner.predict_full}, x, batch_size, warmup)["full"]
    return logits_entry(parts, seconds, labels)
