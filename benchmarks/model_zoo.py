"""Model zoo: timm and torchvision architectures at 224x224 through the whole export path, with per-architecture pass/fail.

For each architecture (weights as initialized: export, parity and latency do not need trained
weights; 1000 classes, ImageNet normalization) the script
  1. traces it and lists its cut points,
  2. places two exits by the pareto scheme and builds the eenet model (its default exit heads),
  3. exports it with verification (every graph against PyTorch, cascade.onnx against the chain),
  4. checks that the stage chain with no exit gives full.onnx's logits (random inputs),
  5. writes the batch-1 copy (`edgeexit static-batch --batch 1`) and times, at batch 1 and one
     onnxruntime thread, its full.onnx and its cascade.onnx with thresholds that let no input leave
     (no-exit / full) and that send every input out at exit 0 (realized speedup full / exit-0 over the
     MACs-predicted one, 1 / exit 0's relative MACs), interleaved on the same inputs.
A failure at any step is recorded with its step and one-line reason; the others go on.
Writes benchmarks/results/model_zoo.json and prints a markdown table.

    python benchmarks/model_zoo.py                # every architecture (the lead's run, on a quiet machine)
    python benchmarks/model_zoo.py --quick        # three architectures
    python benchmarks/model_zoo.py --architectures timm:resnet18 --no-timing   # one, without timing
    python benchmarks/model_zoo.py --architectures timm:resnet18 --merge       # rerun one, keep the file's other rows
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnxruntime as ort
import torch

from edgeexit.errors import first_line
from edgeexit.export import export_bundle
from edgeexit.export.static_batch import static_batch_bundle
from edgeexit.runtime.cascade import session_options
from edgeexit.runtime.files import write_json_atomic
from edgeexit.runtime.cascade_bytes import tunable_cascade_bytes
from edgeexit.runtime.manifest import FULL_NAME, load_manifest
from edgeexit.runtime.report import interleaved_timings
from edgeexit.train.backbones import build_backbone, resolve_backbone
from edgeexit.train.config import ModelConfig
from edgeexit.train.cuts import CutGraph
from edgeexit.train.methods import get_method
from edgeexit.train.models import EarlyExitModel, save_model
from edgeexit.train.placement import place_exits

RESULTS = Path(__file__).resolve().parent / "results"
INPUT_SHAPE = (3, 224, 224)
NUM_CLASSES = 1000
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
ARCHITECTURES = [
    # timm 1.0: the twelve of the issue that measured the cut tracer, then a few more
    "timm:mobilenetv3_small_100", "timm:efficientnet_b0", "timm:ghostnet_100", "timm:regnetx_002",
    "timm:convnext_atto", "timm:resnet18", "timm:fastvit_t8", "timm:repvit_m0_9", "timm:mobilenetv4_conv_small",
    "timm:levit_128s", "timm:mobilevit_xxs", "timm:efficientvit_b0", "timm:mobileone_s0", "timm:tinynet_e",
    # torchvision
    "torchvision:resnet18", "torchvision:resnet50", "torchvision:mobilenet_v2", "torchvision:mobilenet_v3_small",
    "torchvision:mobilenet_v3_large", "torchvision:efficientnet_b0", "torchvision:shufflenet_v2_x1_0",
    "torchvision:mnasnet0_5", "torchvision:regnet_y_400mf", "torchvision:densenet121", "torchvision:squeezenet1_1",
    "torchvision:convnext_tiny",
]
QUICK = ["timm:mobilenetv3_small_100", "torchvision:mobilenet_v3_small", "timm:regnetx_002"]
CASES = {"exit0": [0.0, 0.0], "no_exit": [1.0, 1.0]}  # confidence thresholds: 0 sends every input out, 1 none
GOALS = {"pass_share": 0.9, "median_no_exit_over_full": 1.05, "median_exit0_realized_over_predicted": 0.85}


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build(name: str, work: Path, row: dict[str, Any]) -> Path:
    """Steps 1-2: trace, place two exits (pareto), write model.pt; `row` gets the cut points, MACs and cuts as found."""
    method = get_method("eenet")
    resolved = resolve_backbone(name)
    torch.manual_seed(0)
    net = build_backbone(name, NUM_CLASSES, INPUT_SHAPE[0])
    graph = CutGraph(net, INPUT_SHAPE)
    row.update(cut_points=len(graph.candidates), full_mmacs=graph.full_macs / 1e6,
               params_m=sum(p.numel() for p in net.parameters()) / 1e6)
    cuts = row["cuts"] = [point.name for point in place_exits("pareto", 2, graph.candidates)]
    config = ModelConfig(backbone=name, backbone_source=resolved.source, method="eenet", exit_type=method.exit_type,
                         cuts=cuts, num_classes=NUM_CLASSES, input_shape=INPUT_SHAPE, mean=IMAGENET_MEAN,
                         std=IMAGENET_STD, policy=method.policy, frozen_backbone=method.frozen_backbone)
    model = EarlyExitModel(config, backbone=net).eval()
    save_model(model, work / "model.pt")
    return work / "model.pt"


def session(source: Path | bytes, threads: int = 1) -> ort.InferenceSession:
    return ort.InferenceSession(source if isinstance(source, bytes) else str(source), session_options(threads),
                                providers=["CPUExecutionProvider"])


def chain_vs_full(bundle: Path, samples: int = 4) -> float:
    """Step 4: max |logits of the stage chain run to its end - full.onnx's| on random inputs."""
    manifest = load_manifest(bundle)
    x = np.random.default_rng(0).standard_normal((samples, *INPUT_SHAPE)).astype(np.float32)
    features = x
    for stage in manifest.stages:
        sess = session(manifest.path(stage.file))
        features = sess.run(None, {sess.get_inputs()[0].name: features})[0]  # features first; the final stage's logits
    full = session(bundle / FULL_NAME)
    return float(np.abs(features - full.run(None, {full.get_inputs()[0].name: x})[0]).max())


def time_batch1(bundle_b1: Path, samples: int) -> dict[str, float]:
    """Step 5: interleaved p50s at batch 1, 1 thread, of full.onnx and cascade.onnx (no exit, all at exit 0)."""
    manifest = load_manifest(bundle_b1)
    full = session(bundle_b1 / FULL_NAME)
    tunable = tunable_cascade_bytes(manifest, manifest.cascade_for(1))
    fns: dict[str, Callable[[np.ndarray], object]] = {"full": lambda b: full.run(None, {full.get_inputs()[0].name: b})}
    for case, thresholds in CASES.items():
        sess = session(tunable)
        feeds = {"thresholds": np.asarray(thresholds, dtype=np.float64)}
        fns[case] = lambda b, s=sess, f=feeds: s.run(None, {s.get_inputs()[0].name: b, **f})
    x = np.random.default_rng(1).standard_normal((samples, *INPUT_SHAPE)).astype(np.float32)
    timed = interleaved_timings(fns, x, 1, warmup=5, label=bundle_b1.parent.name)
    for case, where in (("exit0", 0), ("no_exit", len(manifest.stages) - 1)):
        exits = {int(out[2][0]) for out in timed[case][0]}  # cascade.onnx's third output: the exit index per input
        if exits != {where}:
            raise AssertionError(f"cascade.onnx left at {sorted(exits)} where the {case} thresholds send inputs to {where}")
    p50 = {name: statistics.median(seconds) for name, (_, seconds) in timed.items()}
    exit0_cost = manifest.exit_costs()[0]
    realized, predicted = p50["full"] / p50["exit0"], 1 / exit0_cost
    return {"full_p50_ms": p50["full"] * 1e3, "no_exit_p50_ms": p50["no_exit"] * 1e3, "exit0_p50_ms": p50["exit0"] * 1e3,
            "no_exit_over_full": p50["no_exit"] / p50["full"], "exit0_relative_macs": exit0_cost,
            "exit0_realized_speedup": realized, "exit0_predicted_speedup": predicted,
            "exit0_realized_over_predicted": realized / predicted}


def run_one(name: str, work: Path, timing: bool, samples: int) -> dict[str, Any]:
    """Every step for one architecture; a failing step ends it with {"status": "fail", "step", "reason"}."""
    row: dict[str, Any] = {"architecture": name}
    step = "build"
    start = time.perf_counter()
    try:
        model_pt = build(name, work, row)
        step = "export"
        progress(f"{name}: exporting (cuts {', '.join(row['cuts'])})")
        started = time.perf_counter()
        result = export_bundle(model_pt, work / "bundle")
        row["export_s"] = time.perf_counter() - started
        row["verify_max_diff"] = result.worst_diff
        step = "chain == full"
        row["chain_vs_full_max_diff"] = chain_vs_full(work / "bundle")
        if row["chain_vs_full_max_diff"] > 1e-3:
            raise AssertionError(f"the no-exit chain differs from full.onnx by {row['chain_vs_full_max_diff']:.2e}")
        step = "static-batch 1"
        static_batch_bundle(work / "bundle", work / "bundle_b1", 1)
        if timing:
            step = "timing"
            row.update(time_batch1(work / "bundle_b1", samples))
        row["status"] = "pass"
    except Exception as exc:  # one architecture's failure, whatever its type, is a row of the table
        row.update(status="fail", step=step, reason=f"{type(exc).__name__}: {first_line(exc)}")
    row["seconds"] = time.perf_counter() - start
    progress(f"{name}: {row['status']}" + (f" at {row['step']}: {row['reason']}" if row["status"] == "fail" else ""))
    return row


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    passed = [r for r in rows if r["status"] == "pass"]
    summary: dict[str, Any] = {"architectures": len(rows), "passed": len(passed),
                               "pass_share": len(passed) / max(len(rows), 1)}
    for key in ("no_exit_over_full", "exit0_realized_over_predicted"):
        values = [r[key] for r in passed if key in r]
        summary[f"median_{key}"] = statistics.median(values) if values else None
    return summary


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| architecture | cut points | exits at | MMACs | no-exit / full | exit-0 realized / predicted | result |",
             "|---|---:|---|---:|---:|---:|---|"]
    for r in rows:
        ratio = lambda key: f"{r[key]:.3f}" if key in r else "-"
        mmacs = f"{r['full_mmacs']:.0f}" if "full_mmacs" in r else "-"
        result = "pass" if r["status"] == "pass" else f"fails at {r['step']}: {r['reason']}"
        lines.append(f"| {r['architecture']} | {r.get('cut_points', '-')} | {', '.join(r.get('cuts', [])) or '-'} | {mmacs} "
                     f"| {ratio('no_exit_over_full')} | {ratio('exit0_realized_over_predicted')} | {result} |")
    return "\n".join(lines)


def merged(path: Path, settings: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the results file at `path` with `rows` in place of those of the same architectures (new ones
    last); SystemExit before any run when the file was measured with other settings (timing, machine, versions)."""
    earlier = json.loads(path.read_text()) if path.is_file() else {"settings": settings, "architectures": []}
    differs = [key for key in settings if earlier["settings"].get(key) != settings[key]]
    if differs:
        raise SystemExit(f"--merge: {path} was measured with other {', '.join(differs)}; use its settings or rerun every architecture")
    new = {row["architecture"]: row for row in rows}
    return [new.pop(row["architecture"], row) for row in earlier["architectures"]] + list(new.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--architectures", default=None, help="comma-separated names (timm:NAME, torchvision:NAME, ...)")
    parser.add_argument("--samples", type=int, default=200, help="timed inputs per graph (batch 1)")
    parser.add_argument("--no-timing", action="store_true", help="skip step 5 (export and parity only)")
    parser.add_argument("--out", type=Path, default=RESULTS / "model_zoo.json")
    parser.add_argument("--merge", action="store_true",
                        help="replace only these architectures' rows in the --out file (measured with the same settings)")
    args = parser.parse_args(argv)
    names = args.architectures.split(",") if args.architectures else QUICK if args.quick else ARCHITECTURES
    import timm
    import torchvision

    settings = {"input_shape": list(INPUT_SHAPE), "num_classes": NUM_CLASSES, "exits": "pareto, 2", "method": "eenet",
                "timing": None if args.no_timing else {"batch": 1, "threads": 1, "samples": args.samples},
                "machine": platform.machine(), "processor": platform.processor(),
                "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                             "timm": timm.__version__, "onnxruntime": ort.__version__}}
    if args.merge:
        merged(args.out, settings, [])  # refuses a file of other settings before the runs
    torch.set_num_threads(1)
    rows = []
    for name in names:
        with tempfile.TemporaryDirectory(prefix="model_zoo-") as tmp:
            rows.append(run_one(name, Path(tmp), not args.no_timing, args.samples))
    if args.merge:
        rows = merged(args.out, settings, rows)
    report = {"settings": settings, "goals": GOALS, "summary": summarize(rows), "architectures": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, report)
    print(markdown(rows))
    print(json.dumps(report["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
