"""Measured cost of cut points: each candidate's backbone prefix exported to ONNX and timed on onnxruntime.

The export side owns it (it exports graphs); `edgeexit train --placement-cost latency` and
`edgeexit cuts --profile` reach it through the workflows, so the training code never imports
the exporter.

Placement schemes read a cut's cost as the fraction of the full backbone an input has
spent when it reaches the cut. By default that is MACs; with the latency cost it is the
measured time of the prefix graph (input -> cut features) over the whole backbone's,
on this machine's CPU with the given threads and batch size.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort
import torch

from edgeexit.train.cuts import CutGraph, CutPoint
from edgeexit.export.onnx_graphs import SingleOutput, export_graph
from edgeexit.runtime.cascade import session_options
from edgeexit.errors import ConfigError
from edgeexit.runtime.profiles import Timing
from edgeexit.runtime.profile import time_calls

DEFAULT_REPEATS = 50


def cut_latencies(graph: CutGraph, threads: int = 1, batch_size: int = 1, repeats: int = DEFAULT_REPEATS,
                  progress: Callable[[str], None] = lambda m: None) -> tuple[dict[str, Timing], Timing]:
    """Timing of every candidate cut's prefix graph and of the whole backbone, exported on the fly."""
    if batch_size < 1 or threads < 0:
        raise ConfigError(f"--batch-size must be >= 1 and --threads >= 0, got {batch_size} and {threads}")
    example = torch.zeros(1, *graph.input_shape)
    x = np.random.default_rng(0).standard_normal((batch_size, *graph.input_shape)).astype(np.float32)
    options = session_options(threads)
    modules = {point.name: graph.split([point.name])[0] for point in graph.candidates}
    modules["full"] = graph.backbone
    sessions = {}
    with tempfile.TemporaryDirectory(prefix="edgeexit-cuts-") as tmp:
        for i, (name, module) in enumerate(modules.items()):
            progress(f"exporting prefix {i + 1}/{len(modules)}: {name}")
            path = Path(tmp) / f"prefix_{i}.onnx"
            export_graph(SingleOutput(module), example, path, "input", ["output"], simplify=False)
            sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    fns = {name: (lambda s=s: s.run(None, {"input": x})) for name, s in sessions.items()}
    timed = time_calls(fns, repeats, progress, "timing cut prefixes")
    return {name: timed[name] for name in modules if name != "full"}, timed["full"]


def latency_candidates(candidates: Sequence[CutPoint], latencies: dict[str, Timing], full: Timing) -> list[CutPoint]:
    """The candidates with `fraction` = median prefix latency over the full backbone's (what placement reads)."""
    return [dataclasses.replace(p, fraction=latencies[p.name].p50 / full.p50) for p in candidates]


def measured_candidates(graph: CutGraph) -> list[CutPoint]:
    """The graph's candidates placed by measured latency (1 thread, batch 1): what `--placement-cost latency` places by."""
    return latency_candidates(graph.candidates, *cut_latencies(graph))
