"""cascade.onnx (one graph) vs the stage chain vs full.onnx: latency where every input leaves at exit 0, at exit 1, or nowhere.

For each backbone an exit-augmented model (weights as initialized: latency does not depend on
them, and thresholds force where inputs leave) is exported with two exits at the given cuts. Then,
for every batch size and thread count, full.onnx, the stage chain (CascadeRunner) and the one
graph (cascade.onnx in a bare onnxruntime session, as a C/C++ or Node client runs it) run interleaved on the same inputs (report.interleaved_timings;
each graph WARM calls in a row per turn, timed warm: see warm), with thresholds that send every input out at exit 0, at exit 1, or through every stage (no exit);
at batch 1 also "graph1", the batch-1 variant of the graph (an If per exit, no survivor
compaction: build_cascade(compact=False)), which shows what compaction costs at batch 1.
Also timed, for reference: "prefix" k, the backbone alone up to exit k's cut (stage segments, no heads, no
decisions), i.e. what leaving at exit k would cost if exit heads, decisions and stage boundaries were free;
"nested", the stage segments nested under If nodes as in cascade.onnx but with no heads and no decisions,
i.e. what the no-exit path costs from the stage boundaries alone.
Ratios are p50 / full.onnx's p50 in the same run; "realized over predicted" is the realized
speedup (full / case) over the MACs-predicted one (1 / relative MACs of the exit); "realized over
prefix" is prefix k's p50 over the case's: the share of the backbone's own speedup the engine keeps.
Writes benchmarks/results/one_graph.json and one_graph.png.

    python benchmarks/one_graph.py                          # the published numbers (quiet machine)
    python benchmarks/one_graph.py --backbones resnet20 --samples 64 --batches 1 --threads 1   # smoke run
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgeexit.export import export_bundle
from edgeexit.export.cascade_graph import write_cascade
from edgeexit.runtime.calibrate import stderr_progress
from edgeexit.runtime.cascade import CascadeRunner, session_options
from edgeexit.runtime.cascade_bytes import tunable_cascade_bytes
from edgeexit.runtime.manifest import load_manifest
from edgeexit.runtime.bundle import save_manifest
from edgeexit.runtime.files import write_json_atomic
from edgeexit.runtime.report import interleaved_timings
from edgeexit.train.data import load_data
from edgeexit.train.models import save_model
from edgeexit.train.assembly import build_model

RESULTS = Path(__file__).resolve().parent / "results"
CUTS = {"resnet20": "layer1.2,layer2.2", "resnet56": "layer1.8,layer2.8"}
# confidence thresholds (T = 0: every input exits, T = 1: none does) -> where inputs leave
CASES = {"exit0": [0.0, 0.0], "exit1": [1.0, 0.0], "no_exit": [1.0, 1.0]}
WARM = 4  # calls per graph and turn (see warm)
REFERENCES = ("prefix", "nested")  # graphs timed for comparison only (see reference_runs)
GOALS = {"no_exit_over_full_1_thread": 1.02, "no_exit_over_full_2_threads": 1.05, "realized_over_predicted": 0.9}


def prepare(backbone: str, work: Path, input_size: int, exit_type: str) -> tuple[Path, Path]:
    """Export an untrained two-exit model of `backbone` at the cuts of CUTS; returns the bundle and
    a copy whose cascade.onnx is the batch-1 graph (If per exit, no survivor compaction)."""
    splits = load_data("digits", input_size=input_size)
    model = build_model(splits, backbone, exit_type, "linear", 2, exit_at=CUTS[backbone].split(","))
    save_model(model, work / f"{backbone}.pt")
    stderr_progress(f"exporting {backbone}")
    bundle, batch1 = work / backbone, work / f"{backbone}_batch1"
    export_bundle(work / f"{backbone}.pt", bundle)
    shutil.copytree(bundle, batch1)
    manifest = load_manifest(batch1, check_hashes=False)
    save_manifest(batch1, dataclasses.replace(manifest, cascade=write_cascade(manifest, compact=False)))
    return bundle, batch1


def segments(bundle: Path) -> list[onnx.ModelProto]:
    """The bundle's stage graphs without their exit heads (each to its first output), names prefixed s{k}/."""
    manifest = load_manifest(bundle, check_hashes=False)
    models = []
    for k, spec in enumerate(manifest.stages):
        stage = onnx.load(str(manifest.path(spec.file)))
        segment = onnx.utils.Extractor(stage).extract_model([stage.graph.input[0].name], [stage.graph.output[0].name])
        models.append(onnx.compose.add_prefix(segment, f"s{k}/"))
    return models


def prefix_graph(parts: list[onnx.ModelProto], cut: int) -> onnx.ModelProto:
    """The backbone up to exit `cut` as one graph (segments 0..cut, globally pooled so that returning it costs
    what returning an exit's results does): what leaving at that exit would cost if heads, decisions and
    stage boundaries were free."""
    model = onnx.ModelProto()
    model.CopyFrom(parts[0])
    for segment in parts[1 : cut + 1]:
        model = onnx.compose.merge_models(model, segment, io_map=[(model.graph.output[0].name, segment.graph.input[0].name)])
    model.graph.node.append(helper.make_node("GlobalAveragePool", [model.graph.output[0].name], ["pooled"]))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("pooled", TensorProto.FLOAT, None))
    return model


def nested_graph(parts: list[onnx.ModelProto]) -> onnx.ModelProto:
    """The segments nested under If nodes as cascade.onnx nests its stages, every If going on (a graph input,
    so onnxruntime cannot fold it), no heads and no decisions: what the no-exit path would cost if only
    the stage boundaries did."""

    def level(k: int, x: str) -> tuple[list, list, str]:
        graph = parts[k].graph
        nodes = []
        for node in graph.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.input[:] = [x if name == graph.input[0].name else name for name in node.input]
            nodes.append(copy)
        out = graph.output[0].name
        if k == len(parts) - 1:
            return nodes, list(graph.initializer), out
        inner, inner_inits, inner_out = level(k + 1, out)
        go_on = helper.make_graph(inner, f"go_on_{k}", [], [helper.make_tensor_value_info(inner_out, TensorProto.FLOAT, None)], initializer=inner_inits)
        stop = helper.make_graph([helper.make_node("Identity", ["never"], [f"stop_{k}"])], f"stop_{k}", [],
                                 [helper.make_tensor_value_info(f"stop_{k}", TensorProto.FLOAT, None)])
        nodes.append(helper.make_node("If", ["go_on"], [f"level_{k}"], then_branch=go_on, else_branch=stop))
        return nodes, list(graph.initializer), f"level_{k}"

    nodes, initializers, out = level(0, "input")
    nodes.append(helper.make_node("Identity", [out], ["logits"]))
    initializers += [numpy_helper.from_array(np.array(True), "go_on"), numpy_helper.from_array(np.zeros((1, 1), np.float32), "never")]
    first = parts[0].graph.input[0]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, [d.dim_param or d.dim_value for d in first.type.tensor_type.shape.dim]),
              helper.make_tensor_value_info("go_on", TensorProto.BOOL, [])]
    graph = helper.make_graph(nodes, "nested", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], initializer=initializers)
    model = helper.make_model(graph, opset_imports=parts[0].opset_import)
    model.ir_version = parts[0].ir_version
    return model


def session_call(model: onnx.ModelProto | bytes | Path, threads: int, feeds: dict[str, np.ndarray] | None = None) -> Callable[[np.ndarray], list]:
    """One onnxruntime session run per batch, as a C/C++ or Node client makes it (all outputs, no edgeexit code around it)."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, session_options(threads), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda b: session.run(None, {name: b, **(feeds or {})})


def reference_runs(bundle: Path, threads: int) -> dict[str, Callable[[np.ndarray], list]]:
    """prefix_exit{k} and nested_no_exit as timed calls."""
    parts = segments(bundle)
    models = {f"prefix_exit{cut}": prefix_graph(parts, cut) for cut in range(len(parts) - 1)}
    models["nested_no_exit"] = nested_graph(parts)
    return {name: session_call(model, threads) for name, model in models.items()}


def warm(fn: Callable[[np.ndarray], object]) -> Callable[[np.ndarray], tuple[object, list[float]]]:
    """`fn` run WARM times in a row on a batch, the first call untimed: (last output, seconds of the others).

    Interleaving single calls times every graph right after a different one, with its weights and code
    out of cache; a deployed cascade runs back to back. Measured at batch 1, resnet20: the same session
    took up to 10% longer right after another graph than right after itself, which moved the ratios here
    by several points from run to run."""
    def run(batch: np.ndarray) -> tuple[object, list[float]]:
        out, seconds = fn(batch), []
        for _ in range(WARM - 1):
            start = time.perf_counter()
            out = fn(batch)
            seconds.append(time.perf_counter() - start)
        return out, seconds

    return run


def measure(bundles: tuple[Path, Path], batch: int, threads: int, samples: int) -> dict:
    """Interleaved p50 latencies of full.onnx, the reference graphs and the engines at every case; ratios over full.

    full.onnx, the references and the one graph are timed as bare session runs (what a client without
    edgeexit's Python pays); the stage chain, which is a Python loop over stage sessions, through
    CascadeRunner.predict with its thresholds set before timing. At batch 1 the batch-1 graph (graph1) runs too."""
    bundle = bundles[0]
    chain = CascadeRunner(bundle, threads=threads)
    x = np.random.default_rng(0).standard_normal((samples, *chain.manifest.input_shape)).astype(np.float32)
    fns = {"full": session_call(bundle / "full.onnx", threads), **reference_runs(bundle, threads)}
    graphs = {"graph": bundle, "graph1": bundles[1]} if batch == 1 else {"graph": bundle}
    for case, thresholds in CASES.items():
        runner = CascadeRunner(bundle, threads=threads)
        runner.set_thresholds(thresholds)
        fns[f"chain_{case}"] = runner.predict
        for name, path in graphs.items():
            # the copy that takes thresholds as an input (the file holds them as constants)
            fns[f"{name}_{case}"] = session_call(tunable_cascade_bytes(load_manifest(path)), threads,
                                                 {"thresholds": np.array(thresholds, dtype=np.float64)})
    timed = interleaved_timings({name: warm(fn) for name, fn in fns.items()}, x, batch, warmup=5, progress=stderr_progress,
                                label=f"{bundle.name} bs{batch} t{threads}")
    timings = {name: ([out for out, _ in calls], [s for _, seconds in calls for s in seconds]) for name, (calls, _) in timed.items()}
    p50 = {name: float(np.median(seconds)) for name, (_, seconds) in timings.items()}
    costs = chain.manifest.exit_costs()
    entry = {"backbone": bundle.name, "batch": batch, "threads": threads, "full_p50_ms": p50["full"] * 1e3,
             "relative_macs": {"exit0": costs[0], "exit1": costs[1], "no_exit": costs[2]}, "over_full": {}, "realized_over_predicted": {},
             "realized_over_prefix": {}}
    for name, seconds in p50.items():
        if name == "full":
            continue
        engine, case = name.split("_", 1)
        entry["over_full"][name] = seconds / p50["full"]
        if engine in REFERENCES:
            continue
        exits = [out.exit_index if engine == "chain" else out[2] for out in timings[name][0]]
        assert all((e == {"exit0": 0, "exit1": 1, "no_exit": 2}[case]).all() for e in exits), f"{name} left elsewhere"
        entry["realized_over_predicted"][name] = entry["relative_macs"][case] * p50["full"] / seconds
        if case != "no_exit":
            entry["realized_over_prefix"][name] = p50[f"prefix_{case}"] / seconds
    return entry


def plot(rows: list[dict], path: Path) -> None:
    """Per configuration, p50 / full.onnx of each engine and case (1.0 = full.onnx)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.8), sharey=True, squeeze=False)
    for ax, r in zip(axes[0], rows):
        names = list(r["over_full"])
        colors = {"chain": "tab:orange", "graph": "tab:blue", "graph1": "tab:green", "prefix": "tab:gray", "nested": "tab:gray"}
        ax.bar(range(len(names)), [r["over_full"][n] for n in names], color=[colors[n.split("_")[0]] for n in names])
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(range(len(names)), [n.replace("_", "\n", 1) for n in names], fontsize="xx-small")
        ax.set_title(f"{r['backbone']} bs{r['batch']} t{r['threads']}", fontsize="small")
    axes[0][0].set_ylabel("p50 / full.onnx p50")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="resnet20,resnet56")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--exit-type", default="plain", help="exit heads: plain (as the demo and perf table) or pool (cheap heads)")
    parser.add_argument("--batches", default="1,64", help="batch sizes, comma separated")
    parser.add_argument("--threads", default="1,2", help="thread counts, comma separated")
    parser.add_argument("--samples", type=int, default=1024, help="inputs per configuration (each batch: WARM - 1 timed calls per graph)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for one_graph.json and one_graph.png")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in args.backbones.split(","):
            bundles = prepare(backbone, Path(tmp), args.input_size, args.exit_type)
            for batch in map(int, args.batches.split(",")):
                for threads in map(int, args.threads.split(",")):
                    rows.append(measure(bundles, batch, threads, max(args.samples, batch * 8)))
    settings = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v != parser.get_default(k))
    write_json_atomic(out / "one_graph.json", {"goals": GOALS, "command": f"python benchmarks/one_graph.py {settings}".strip(), "rows": rows})
    plot(rows, out / "one_graph.png")
    for r in rows:
        ratios = "  ".join(f"{k} {v:.3f}" for k, v in r["over_full"].items())
        print(f"{r['backbone']} bs{r['batch']} t{r['threads']} full {r['full_p50_ms']:.3f} ms  {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
