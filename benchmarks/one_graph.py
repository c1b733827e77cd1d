"""cascade.onnx (one graph) vs the stage chain vs full.onnx: latency where every input leaves at exit 0, at exit 1, or nowhere.

For each backbone an exit-augmented model (weights as initialized: latency does not depend on
them, and thresholds force where inputs leave) is exported with two exits at the given cuts. Then,
for every batch size and thread count, full.onnx, the stage chain (CascadeRunner) and the one
graph (GraphRunner on cascade.onnx) run interleaved on the same inputs (report.interleaved_timings),
with thresholds that send every input out at exit 0, at exit 1, or through every stage (no exit);
at batch 1 also "graph1", the batch-1 variant of the graph (an If per exit, no survivor
compaction: build_cascade(compact=False)), which shows what compaction costs at batch 1.
Also timed: "prefix" k, the backbone alone up to exit k's cut (stage segments, no heads, no decisions), i.e. what
leaving at exit k would cost if exit heads, decisions and stage boundaries were free.
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
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from edgeexit.export import export_bundle
from edgeexit.export.cascade_graph import write_cascade
from edgeexit.runtime.calibrate import stderr_progress
from edgeexit.runtime.cascade import CascadeRunner, check_batch, session_options
from edgeexit.runtime.graph import GraphRunner
from edgeexit.runtime.manifest import load_manifest, save_manifest, write_json_atomic
from edgeexit.runtime.report import interleaved_timings
from edgeexit.train.data import load_data
from edgeexit.train.models import save_model
from edgeexit.train.assembly import build_model

RESULTS = Path(__file__).resolve().parent / "results"
CUTS = {"resnet20": "layer1.2,layer2.2", "resnet56": "layer1.8,layer2.8"}
# confidence thresholds (T = 0: every input exits, T = 1: none does) -> where inputs leave
CASES = {"exit0": [0.0, 0.0], "exit1": [1.0, 0.0], "no_exit": [1.0, 1.0]}
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


def prefix_graph(bundle: Path, cut: int) -> Path:
    """The backbone up to exit `cut` as one graph (stage segments 0..cut, no heads, no decisions; globally pooled):
    what that exit would cost if heads, decisions and stage boundaries were free. Written beside the bundle."""
    manifest = load_manifest(bundle, check_hashes=False)
    model = None
    for k in range(cut + 1):
        stage = onnx.load(str(manifest.path(manifest.stages[k].file)))
        segment = onnx.utils.Extractor(stage).extract_model([stage.graph.input[0].name], [stage.graph.output[0].name])
        segment = onnx.compose.add_prefix(segment, f"s{k}/")
        model = segment if model is None else onnx.compose.merge_models(model, segment, io_map=[(model.graph.output[0].name, segment.graph.input[0].name)])
    # pooled to one vector per input, so that returning the features costs what returning an exit's results does
    features = model.graph.output[0]
    pooled = onnx.helper.make_node("GlobalAveragePool", [features.name], ["pooled"])
    model.graph.node.append(pooled)
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info("pooled", onnx.TensorProto.FLOAT, None))
    path = bundle.parent / f"{bundle.name}_prefix{cut}.onnx"
    onnx.save(model, str(path))
    return path


def measure(bundles: tuple[Path, Path], batch: int, threads: int, samples: int) -> dict:
    """Interleaved p50 latencies of full.onnx, the backbone prefixes and the engines at every case; ratios over full.
    Each (engine, case) gets its own runner with its thresholds set before timing. At batch 1 the batch-1 graph (graph1) runs too."""
    bundle = bundles[0]
    engines = {"chain": (CascadeRunner, bundle), "graph": (GraphRunner, bundle)}
    if batch == 1:
        engines["graph1"] = (GraphRunner, bundles[1])
    chain = CascadeRunner(bundle, threads=threads)
    shape = chain.manifest.input_shape
    x = np.random.default_rng(0).standard_normal((samples, *shape)).astype(np.float32)
    fns = {"full": chain.predict_full}
    for cut in range(chain.num_exits):
        session = ort.InferenceSession(str(prefix_graph(bundle, cut)), session_options(threads), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        fns[f"prefix_exit{cut}"] = lambda b, session=session, name=name: session.run(None, {name: check_batch(b, shape)})
    for case, thresholds in CASES.items():
        for name, (runner_class, path) in engines.items():
            runner = runner_class(path, threads=threads)
            runner.set_thresholds(thresholds)
            fns[f"{name}_{case}"] = runner.predict
    timings = interleaved_timings(fns, x, batch, warmup=5, progress=stderr_progress, label=f"{bundle.name} bs{batch} t{threads}")
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
        if engine == "prefix":
            continue
        exits = timings[name][0]
        assert all((r.exit_index == {"exit0": 0, "exit1": 1, "no_exit": 2}[case]).all() for r in exits), f"{name} left elsewhere"
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
        colors = {"chain": "tab:orange", "graph": "tab:blue", "graph1": "tab:green", "prefix": "tab:gray"}
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
    parser.add_argument("--samples", type=int, default=2048, help="inputs per configuration (batch 1: one call each)")
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
    write_json_atomic(out / "one_graph.json", {"goals": GOALS, "command": "python benchmarks/one_graph.py " + " ".join(argv or sys.argv[1:]), "rows": rows})
    plot(rows, out / "one_graph.png")
    for r in rows:
        ratios = "  ".join(f"{k} {v:.3f}" for k, v in r["over_full"].items())
        print(f"{r['backbone']} bs{r['batch']} t{r['threads']} full {r['full_p50_ms']:.3f} ms  {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
