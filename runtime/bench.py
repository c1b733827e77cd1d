"""`edgeexit bench`: measured latency of full.onnx vs the cascade (and optional baselines) on the same inputs.

Timings are interleaved: for each batch every variant runs once, in rotating order, so
drift and noise from other processes hit all variants alike. The realized speedup
(mean full.onnx time / mean cascade time) is set against the speedup the MACs predict
(1 / relative MACs); the oracle (each input leaves at its first correct exit) bounds
the cost any threshold could reach.
"""
from __future__ import annotations

import platform
import time
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort

from edgeexit.runtime.calibrate import CascadeSimulator, shared_grids
from edgeexit.runtime.cascade import CascadeResult, CascadeRunner
from edgeexit.runtime.errors import ConfigError
from edgeexit.runtime.report import batches, latency_stats, merge_results

SWEEP_POINTS = 6
Progress = Callable[[str], None]


def interleaved_timings(fns: dict[str, Callable[[np.ndarray], object]], x: np.ndarray, batch_size: int,
                        warmup: int = 3, progress: Progress = lambda m: None,
                        label: str = "timing") -> dict[str, tuple[list, list[float]]]:
    """Time every fn on each batch of x, rotating their order per batch; warm-up calls not counted."""
    parts = batches(len(x), batch_size)
    names = list(fns)
    for part in parts[:warmup]:
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


def accuracy(predictions: np.ndarray, labels: np.ndarray | None) -> float | None:
    return None if labels is None else float((predictions == labels).mean())


def timing_entry(seconds: Sequence[float], samples: int) -> dict:
    """Latency percentiles per call plus throughput in inputs per second."""
    total = float(np.sum(seconds))
    return {"latency_ms": latency_stats(seconds), "throughput_per_s": samples / total if total > 0 else None}


def cascade_entry(runner: CascadeRunner, parts: list[CascadeResult], seconds: list[float],
                  labels: np.ndarray | None) -> dict:
    """Accuracy, MACs, exits and latency of a cascade run, with latency grouped by the deepest exit per call."""
    result = merge_results(parts)
    deepest = np.array([p.exit_index.max() for p in parts])
    per_exit = {}
    for index in range(result.num_stages):
        calls = np.asarray(seconds)[deepest == index]
        per_exit[str(index)] = latency_stats(calls) if calls.size else None
    return {
        "accuracy": accuracy(result.predictions, labels),
        "relative_macs": runner.relative_macs(result),
        "exit_counts": result.exit_counts(),
        "thresholds": runner.thresholds,
        **timing_entry(seconds, len(result.predictions)),
        "latency_by_exit_ms": per_exit,
    }


def oracle(exit_outputs: Sequence[dict[str, np.ndarray]], final_logits: np.ndarray, labels: np.ndarray,
           costs: Sequence[float]) -> dict:
    """Each input leaves at its first exit whose prediction is right (else the final): the cost lower bound."""
    last = len(exit_outputs)
    exit_index = np.full(len(labels), last, dtype=np.int64)
    correct = final_logits.argmax(axis=1) == labels
    for k in reversed(range(last)):
        if "logits" in exit_outputs[k]:
            right = exit_outputs[k]["logits"].argmax(axis=1) == labels
            exit_index[right] = k
            correct |= right
    return {
        "accuracy": float(correct.mean()),
        "relative_macs": float(np.asarray(costs)[exit_index].mean()),
        "exit_counts": np.bincount(exit_index, minlength=last + 1).tolist(),
    }


def sweep_thresholds(grids: Sequence[np.ndarray], points: int) -> list[list[float]]:
    """`points` shared thresholds spread evenly over the candidate grids (one value per exit)."""
    levels = np.linspace(0.0, 1.0, points)
    return [[float(g[round(level * (len(g) - 1))]) for g in grids] for level in levels]


def run_bench(
    runner: CascadeRunner,
    x: np.ndarray,
    labels: np.ndarray | None,
    batch_size: int = 1,
    baselines: dict[str, Callable[[np.ndarray], np.ndarray]] | None = None,
    sweep_points: int = SWEEP_POINTS,
    warmup: int = 3,
    progress: Progress = lambda m: None,
) -> dict:
    """Benchmark full.onnx, the cascade at its thresholds, the cascade without exits and baselines (name -> logits fn)."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    baselines = baselines or {}
    n = len(x)
    fns: dict[str, Callable] = {
        "full_onnx": runner.predict_full,
        "cascade": runner.predict,
        "cascade_no_exit": lambda b: runner.predict(b, use_exits=False),
        **baselines,
    }
    progress(f"benchmark: {n} inputs, batch size {batch_size}, variants {', '.join(fns)}")
    timed = interleaved_timings(fns, x, batch_size, warmup, progress, "main")
    full_parts, full_seconds = timed["full_onnx"]
    full_pred = np.concatenate(full_parts).argmax(axis=1)
    report: dict = {
        "full_onnx": {"accuracy": accuracy(full_pred, labels), "relative_macs": 1.0, **timing_entry(full_seconds, n)},
        "cascade": cascade_entry(runner, *timed["cascade"], labels),
        "cascade_no_exit": cascade_entry(runner, *timed["cascade_no_exit"], labels),
    }
    for name in baselines:
        parts, seconds = timed[name]
        report[name] = {"accuracy": accuracy(np.concatenate(parts).argmax(axis=1), labels), "relative_macs": 1.0,
                        **timing_entry(seconds, n)}
    full_mean = report["full_onnx"]["latency_ms"]["mean"]
    cascade = report["cascade"]
    realized = full_mean / cascade["latency_ms"]["mean"]
    predicted = 1.0 / cascade["relative_macs"]
    report["speedup"] = {
        "realized": realized,
        "macs_predicted": predicted,
        "realized_over_predicted": realized / predicted,
        "no_exit_over_full": report["cascade_no_exit"]["latency_ms"]["mean"] / full_mean,
        **{f"{name}_over_full_onnx": report[name]["latency_ms"]["mean"] / full_mean for name in baselines},
    }
    exit_outputs, final_logits = runner.stage_outputs(x)
    if labels is not None:
        report["oracle"] = oracle(exit_outputs, final_logits, labels, runner.manifest.exit_costs())
    report["sweep"] = threshold_sweep(runner, x, labels, batch_size, exit_outputs, final_logits, sweep_points, progress)
    return {
        "accuracy": cascade["accuracy"],
        "relative_macs": cascade["relative_macs"],
        "exit_counts": cascade["exit_counts"],
        "latency_ms": cascade["latency_ms"],
        "device": runner.device,
        "providers": runner.active_providers,
        "threads": runner.threads or 0,
        "batch_size": batch_size,
        "samples": n,
        "host": platform.machine(),
        "onnxruntime": ort.__version__,
        **report,
    }


def threshold_sweep(runner: CascadeRunner, x: np.ndarray, labels: np.ndarray | None, batch_size: int,
                    exit_outputs: list, final_logits: np.ndarray, points: int, progress: Progress) -> dict:
    """Simulated accuracy/MACs over the whole candidate grid, plus measured latency at `points` shared thresholds."""
    grids = shared_grids(runner.policies, exit_outputs)
    simulated = []
    if labels is not None:
        sim = CascadeSimulator(runner.policies, exit_outputs, final_logits, labels, runner.manifest.exit_costs())
        levels = max(len(g) for g in grids)
        simulated = [sim.evaluate([g[round(i * (len(g) - 1) / max(levels - 1, 1))] for g in grids]).as_dict()
                     for i in range(levels)]
    saved = runner.thresholds
    measured = []
    try:
        for i, thresholds in enumerate(sweep_thresholds(grids, points)):
            runner.set_thresholds(thresholds)
            parts, seconds = interleaved_timings({"cascade": runner.predict}, x, batch_size, 1)["cascade"]
            entry = cascade_entry(runner, parts, seconds, labels)
            entry.pop("latency_by_exit_ms")
            measured.append(entry)
            progress(f"sweep: {i + 1}/{points} thresholds")
    finally:
        runner.set_thresholds(saved)
    return {"simulated": simulated, "measured": measured}
