"""`edgeexit bench`: measured latency of full.onnx vs the cascade (and optional baselines) on the same inputs.

Timings are interleaved: for each batch every variant runs once, in rotating order, so
drift and noise from other processes hit all variants alike. The realized speedup
(mean full.onnx time / mean cascade time) is set against the speedup the MACs predict
(1 / relative MACs); the oracle (each input leaves at its first correct exit) bounds
the cost any threshold could reach.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort

from edgeexit.runtime.calibrate import shared_grids
from edgeexit.runtime.cascade import CascadeResult, CascadeRunner, Runner, session_options
from edgeexit.errors import ConfigError, InputError, first_line
from edgeexit.runtime.graph import open_runner
from edgeexit.runtime.manifest import load_manifest
from edgeexit.runtime.profiles import ENGINES
from edgeexit.runtime.drift import drift_entry
from edgeexit.runtime.report import Progress, cascade_entry, interleaved_timings, logits_entry, merge_results, runner_info
from edgeexit.runtime.simulate import CascadeSimulator, grid_points

SWEEP_POINTS = 6


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


BENCH_ENGINES = (*ENGINES, "both")  # both: the engine `run` picks, timed against the other one


def bench_runners(bundle: str | os.PathLike, engine: str, batch_size: int = 1, **options) -> list[Runner]:
    """The runners `bench --engine` times, the one reported as "cascade" first: `run`'s choice for auto (and for
    both, then the other engine), else the named engine."""
    if engine not in BENCH_ENGINES:
        raise ConfigError(f"unknown engine '{engine}'; choose from: {', '.join(BENCH_ENGINES)}")
    manifest = load_manifest(bundle)
    first = open_runner(manifest, "auto" if engine == "both" else engine, batch_size=batch_size, **options)
    if engine != "both":
        return [first]
    return [first, open_runner(manifest, "chain" if first.engine == "graph" else "graph", batch_size=batch_size, **options)]


BASELINE_PREFIX = "baseline:"  # report key of a user's own static model (bench --baseline MODEL.onnx)


def onnx_baseline(path: str | os.PathLike, runner: Runner) -> Callable[[np.ndarray], np.ndarray]:
    """A user's own static classifier (an ONNX file taking the bundle's input) as a bench variant: logits per batch.

    Runs on the runner's device and threads, so it is timed like full.onnx; InputError when the file is missing or
    not ONNX, ConfigError when it does not take the bundle's input or does not give one logit per class."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"baseline model not found: {path}")
    try:
        session = ort.InferenceSession(str(path), session_options(runner.threads), providers=runner.providers)
    except Exception as exc:  # onnxruntime raises several private exception types
        raise InputError(f"onnxruntime cannot load baseline {path}: {first_line(exc)}") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    want = list(runner.manifest.input_shape)
    if len(inputs) != 1 or inputs[0].type != "tensor(float)" or [d if isinstance(d, int) else None for d in inputs[0].shape[1:]] not in (want, [None] * len(want)):
        got = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
        raise ConfigError(f"baseline {path} must take one float input shaped (batch, {', '.join(map(str, want))}) like the bundle; it takes {got}")
    classes = outputs[0].shape[-1] if outputs and outputs[0].shape else None
    if isinstance(classes, int) and classes != runner.manifest.num_classes:
        raise ConfigError(f"baseline {path} gives {classes} logits per input; the bundle has {runner.manifest.num_classes} classes")
    name, first = inputs[0].name, outputs[0].name
    return lambda batch: session.run([first], {name: batch})[0]


def baseline_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Report keys for baseline files: baseline:STEM, numbered when two files share a stem."""
    stems = [Path(p).stem for p in paths]
    return [f"{BASELINE_PREFIX}{stem}" if stems.count(stem) == 1 else f"{BASELINE_PREFIX}{stem}_{i}" for i, stem in enumerate(stems)]


def no_exit_call(runner: Runner) -> Callable[[np.ndarray], CascadeResult] | None:
    """The cascade with every exit closed, on the runner's engine: the chain skips the decisions' exits;
    cascade.onnx keeps every input through its thresholds (None when a policy has no such threshold)."""
    if isinstance(runner, CascadeRunner):
        return lambda batch: runner.predict(batch, use_exits=False)
    if any(p.forcing is None for p in runner.policies):
        return None
    keep = [p.forcing[1] for p in runner.policies]
    return lambda batch: runner.predict(batch, thresholds=keep)


def run_bench(
    runner: Runner,
    x: np.ndarray,
    labels: np.ndarray | None,
    batch_size: int = 1,
    baselines: dict[str, Callable[[np.ndarray], np.ndarray]] | None = None,
    sweep_points: int = SWEEP_POINTS,
    warmup: int = 3,
    progress: Progress = lambda m: None,
    others: Sequence[Runner] = (),
) -> dict:
    """Benchmark full.onnx, the cascade at its thresholds, the cascade without exits and baselines (name -> logits fn).

    `runner` is the engine reported as "cascade" (the one `run` uses); each of `others` (another engine) adds
    "cascade_ENGINE" and "cascade_ENGINE_no_exit", timed in the same interleaved turns."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    baselines = baselines or {}
    n = len(x)
    engines = {"cascade": runner, **{f"cascade_{other.engine}": other for other in others}}
    fns: dict[str, Callable] = {"full_onnx": runner.predict_full}
    for name, engine in engines.items():
        fns[name] = engine.predict
        no_exit = no_exit_call(engine)
        if no_exit is not None:
            fns[f"{name}_no_exit"] = no_exit
    fns.update(baselines)
    progress(f"benchmark: {n} inputs, batch size {batch_size}, variants {', '.join(fns)}")
    timed = interleaved_timings(fns, x, batch_size, warmup, progress, "main")
    report: dict = {
        "full_onnx": logits_entry(*timed["full_onnx"], labels),
        **{name: logits_entry(*timed[name], labels) for name in baselines},
    }
    for name in baselines:  # a user's own model: its MACs are not known here
        if name.startswith(BASELINE_PREFIX):
            report[name]["relative_macs"] = None
    for name, engine in engines.items():
        report[name] = cascade_entry(engine, *timed[name], labels)
        report[name]["drift"] = drift_entry(engine, merge_results(timed[name][0]).exit_index)  # exit shares vs calibration's
        if f"{name}_no_exit" in timed:
            report[f"{name}_no_exit"] = cascade_entry(engine, *timed[f"{name}_no_exit"], labels)
    full_mean = report["full_onnx"]["latency_ms"]["mean"]
    cascade = report["cascade"]
    realized = full_mean / cascade["latency_ms"]["mean"]
    predicted = 1.0 / cascade["relative_macs"]
    report["speedup"] = {
        "realized": realized,
        "macs_predicted": predicted,
        "realized_over_predicted": realized / predicted,
        # cascade_no_exit -> no_exit_over_full, cascade_chain -> chain_over_full, pytorch_eager -> pytorch_eager_over_full_onnx
        **{f"{name.removeprefix('cascade_')}_over_full": report[name]["latency_ms"]["mean"] / full_mean
           for name in report if name.startswith("cascade_")},
        **{f"{name}_over_full_onnx": report[name]["latency_ms"]["mean"] / full_mean for name in baselines},
    }
    chain = next((r for r in engines.values() if isinstance(r, CascadeRunner)), None)
    chain = chain or CascadeRunner(runner.manifest, runner.device, threads=runner.threads)  # exit outputs for the analysis
    exit_outputs, final_logits = chain.stage_outputs(x)
    if labels is not None:
        report["oracle"] = oracle(exit_outputs, final_logits, labels, runner.manifest.exit_costs())
    report["sweep"] = threshold_sweep(runner, x, labels, batch_size, exit_outputs, final_logits, sweep_points, progress)
    return {
        "accuracy": cascade["accuracy"],
        "relative_macs": cascade["relative_macs"],
        "predicted_latency_ms": cascade["predicted_latency_ms"],
        "measured_latency_ms": cascade["measured_latency_ms"],
        "exit_counts": cascade["exit_counts"],
        "latency_ms": cascade["latency_ms"],
        **runner_info(runner, batch_size, n),
        "onnxruntime": ort.__version__,
        **report,
    }


def threshold_sweep(runner: Runner, x: np.ndarray, labels: np.ndarray | None, batch_size: int,
                    exit_outputs: list, final_logits: np.ndarray, points: int, progress: Progress) -> dict:
    """Simulated accuracy/MACs over the whole candidate grid, plus measured latency at `points` shared thresholds."""
    grids = shared_grids(runner.policies, exit_outputs)
    simulated = []
    if labels is not None:
        sim = CascadeSimulator(runner.policies, exit_outputs, final_logits, labels, runner.manifest.exit_costs())
        simulated = [sim.evaluate(thresholds).as_dict() for thresholds in grid_points(grids)]
    measured = []
    for i, thresholds in enumerate(grid_points(grids, points)):
        run = functools.partial(runner.predict, thresholds=thresholds)
        parts, seconds = interleaved_timings({"cascade": run}, x, batch_size, 1)["cascade"]
        entry = cascade_entry(runner, parts, seconds, labels, thresholds)
        entry.pop("latency_by_exit_ms")
        measured.append(entry)
        progress(f"sweep: {i + 1}/{points} thresholds")
    return {"simulated": simulated, "measured": measured}
