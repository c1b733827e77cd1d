"""The static frontier: every cascade edgeexit builds beside static networks trained the same way.

A saving counts only against what a user would otherwise deploy. This script trains a family of
static networks (`edgeexit pretrain`, one recipe, one data set, one number of epochs), early-exit
networks by the papers' methods (`edgeexit train`) and builds model cascades of the static
networks (`edgeexit export SMALL.pt BIG.pt OUT/`), calibrates every cascade on the val split for
several accuracy drops (`edgeexit calibrate --policy auto`, which also considers ensembles at
deferral), quantizes everything (`edgeexit quantize`), and then measures, on the test split:

- accuracy and exit histogram of every model and operating point (the runtime's own runners), on the
  test split and on a shifted copy of it (each image under one corruption family at severity 3, the
  families taken in turn: inputs unlike the training and calibration data);
- mean milliseconds per input at batch 1 and 1 thread, and inputs/s at batch 64, in ONE
  interleaved run over bare onnxruntime sessions (static: full.onnx; cascades: the batch-1 graph
  at batch 1 and the compacting cascade.onnx at batch 64, fed their thresholds as inputs). Each
  turn calls a graph 4 times in a row on the same input and times the last 3 (warm, as a client
  that serves a stream sees it); the order of graphs rotates per input.

The frontier is drawn per precision (fp32, int8). For each cascade the summary gives its accuracy
gain over the best static network of equal or lower latency, its distance above the line joining the
static points (negative: below the frontier), and its latency over the most accurate static network's;
for each early-exit network, its full.onnx against the static network of the same backbone.

    python benchmarks/frontier.py                 # Fashion-MNIST (npz:../shared/data/fashion-mnist-60k.npz)
    python benchmarks/frontier.py --quick         # digits, 2 epochs, a path check in minutes
    python benchmarks/frontier.py --reuse         # keep trained models/bundles in --work, re-measure only
    python benchmarks/frontier.py --reuse --confidence-level 0.9   # the same models, calibrated with a margin

Results: benchmarks/results/frontier[_quick].json and .png. Take timings on a quiet machine.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgeexit.runtime.corruptions import CORRUPTIONS, corrupt_model_ready
from edgeexit.runtime.datasets import load_eval_data
from edgeexit.runtime.files import write_json_atomic
from edgeexit.runtime.graph import GraphRunner, open_runner
from edgeexit.runtime.manifest import FULL_NAME, load_manifest
from edgeexit.runtime.policies import NO_ENSEMBLE

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FASHION = "npz:../shared/data/fashion-mnist-60k.npz"
DROPS = (0.0, 0.25, 0.5, 1.0)  # accuracy drops (points) each cascade is calibrated for on val
CALLS_PER_TURN = 4  # the first call of a turn is untimed


@dataclass
class Setting:
    """What one run of the benchmark trains and measures."""

    data: str
    epochs: int
    static: tuple[str, ...]
    early_exit: tuple[tuple[str, str, tuple[str, ...]], ...]  # (name, backbone, extra train args; {work} = --work)
    model_cascades: tuple[tuple[str, ...], ...]  # static backbones, small to big
    timing_inputs: int
    throughput_batches: int


FULL = Setting(
    data=FASHION, epochs=8, static=("resnet8", "resnet20", "resnet32"),
    early_exit=(("eenet_resnet20", "resnet20", ("--method", "eenet")),
                ("exclusion_resnet20", "resnet20", ("--method", "exclusion")),
                # PTEENet's branches on the static resnet20 above (frozen): full.onnx is that network
                ("pteenet_resnet20", "resnet20", ("--method", "pteenet", "--weights", "{work}/static_resnet20.pt"))),
    model_cascades=(("resnet8", "resnet20"), ("resnet8", "resnet32"), ("resnet8", "resnet20", "resnet32")),
    timing_inputs=1000, throughput_batches=20,
)
QUICK = Setting(
    data="digits", epochs=2, static=("resnet8", "resnet20"),
    early_exit=(("eenet_resnet20", "resnet20", ("--method", "eenet")),),
    model_cascades=(("resnet8", "resnet20"),),
    timing_inputs=100, throughput_batches=4,
)


@dataclass
class Point:
    """One model at one operating point and precision: accuracy on test, and its measured cost."""

    name: str
    kind: str  # static | early-exit | model-cascade | early-exit-full
    precision: str
    bundle: str
    backbone: str = ""  # the manifest's (the last member's for a model cascade)
    target_drop: float | None = None
    policy: str | None = None
    accuracy: float = 0.0
    relative_macs: float | None = None
    exit_counts: list[int] = field(default_factory=list)
    shifted_accuracy: float = 0.0
    shifted_relative_macs: float | None = None
    shifted_exit_counts: list[int] = field(default_factory=list)
    ms_per_input: float | None = None
    inputs_per_s: float | None = None


def log(message: str) -> None:
    print(f"[frontier {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def edgeexit(*args: str) -> None:
    """One edgeexit command; its own progress goes to stderr, a failure stops the benchmark."""
    log("edgeexit " + " ".join(args))
    subprocess.run([sys.executable, "-m", "edgeexit", *args], check=True, cwd=ROOT)


def build(setting: Setting, work: Path, reuse: bool) -> list[tuple[str, str, Path]]:
    """Train, export, calibrate and quantize everything; returns (name, kind, bundle) per fp32/int8 bundle."""
    common = ("--data", setting.data, "--epochs", str(setting.epochs))
    bundles: list[tuple[str, str, Path]] = []

    def once(path: Path, *args: str) -> Path:
        if not (reuse and path.exists()):
            edgeexit(*args)
        return path

    for backbone in setting.static:
        model = once(work / f"static_{backbone}.pt", "pretrain", "--backbone", backbone, *common, "--out", str(work / f"static_{backbone}.pt"))
        bundles.append((f"static {backbone}", "static", once(work / f"static_{backbone}", "export", str(model), str(work / f"static_{backbone}"))))
    for name, backbone, extra in setting.early_exit:
        extra = tuple(arg.format(work=work) for arg in extra)
        model = once(work / f"{name}.pt", "train", "--backbone", backbone, *common, *extra, "--out", str(work / f"{name}.pt"))
        bundles.append((name, "early-exit", once(work / name, "export", str(model), str(work / name))))
    for members in setting.model_cascades:
        name = "cascade_" + "_".join(members)
        models = [str(work / f"static_{m}.pt") for m in members]
        bundles.append((name, "model-cascade", once(work / name, "export", *models, str(work / name))))
    out = []
    for name, kind, bundle in bundles:
        int8 = once(bundle.with_name(bundle.name + "-int8"), "quantize", str(bundle), str(bundle) + "-int8", "--data", setting.data, "--split", "val")
        out += [(name, kind, bundle), (name, kind, int8)]
    return out


def operating_points(name: str, kind: str, bundle: Path, setting: Setting, reuse: bool,
                     confidence: float | None = None) -> list[Point]:
    """A static bundle as it is; a cascade calibrated on val for each drop (a copy of the bundle per drop), at a
    confidence level when given (`calibrate --confidence-level`)."""
    manifest = load_manifest(bundle, check_hashes=False)
    precision, backbone = manifest.precision, manifest.model.backbone
    if kind == "static":
        return [Point(name, kind, precision, str(bundle), backbone)]
    points = [Point(name + " full.onnx", "early-exit-full" if kind == "early-exit" else "cascade-full", precision,
                    str(bundle), backbone)]
    level = () if confidence is None else ("--confidence-level", str(confidence))
    for drop in DROPS:
        copy = bundle.with_name(f"{bundle.name}-drop{drop}" + ("" if confidence is None else f"-c{confidence}"))
        if not (reuse and copy.exists()):
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(bundle, copy)
            edgeexit("calibrate", str(copy), "--data", setting.data, "--split", "val", "--target-drop", str(drop), "--policy", "auto",
                     *level)
        manifest = load_manifest(copy, check_hashes=False)
        policy = manifest.exits[0].policy
        label = policy.kind + ("" if policy.ensemble == NO_ENSEMBLE else f"+{policy.ensemble}")
        points.append(Point(name, kind, precision, str(copy), backbone, drop, label))
    return points


def evaluate(point: Point, x: np.ndarray, y: np.ndarray) -> tuple[float, float, list[int]]:
    """Accuracy, relative MACs and exit counts of one point on (x, y) with the runtime's own runner."""
    if point.kind in ("static", "early-exit-full", "cascade-full"):
        runner = open_runner(point.bundle, engine="chain")
        logits = np.concatenate([runner.predict_full(x[i:i + 256]) for i in range(0, len(x), 256)])
        return float((logits.argmax(1) == y).mean()), 1.0, []
    runner = open_runner(point.bundle, engine="graph")
    result = runner.predict(x)
    return float((result.predictions == y).mean()), float(runner.relative_macs(result)), [int(c) for c in result.exit_counts()]


def shifted(x: np.ndarray, mean, std) -> np.ndarray:
    """The test inputs, each under one corruption family at the default severity (families in turn, seeded)."""
    out = np.empty_like(x)
    for k, family in enumerate(CORRUPTIONS):
        out[k::len(CORRUPTIONS)] = corrupt_model_ready(x[k::len(CORRUPTIONS)], mean, std, family, seed=k)
    return out


def _session(path: Path | bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), options, providers=["CPUExecutionProvider"])


def callables(point: Point, batch_size: int):
    """A function running one batch through the bare graph this point deploys (full.onnx or a cascade graph)."""
    if point.kind in ("static", "early-exit-full", "cascade-full"):
        session = _session(Path(point.bundle) / FULL_NAME)
        name = session.get_inputs()[0].name
        return lambda batch: session.run(None, {name: batch})
    runner = GraphRunner(point.bundle, threads=1, batch_size=batch_size)  # batch 1: the batch-1 graph when exported
    feeds = runner.feeds()
    session, name = runner.session, runner.manifest.input_spec.name
    return lambda batch: session.run(["prediction", "exit_index"], {name: batch, **feeds})


def time_batch1(points: list[Point], x: np.ndarray) -> None:
    """Mean ms per input at batch 1, one thread, all graphs interleaved input by input."""
    fns = [callables(p, 1) for p in points]
    totals = np.zeros(len(points))
    for i in range(len(x)):
        batch = x[i:i + 1]
        for j in range(len(points)):
            k = (i + j) % len(points)
            fns[k](batch)
            start = time.perf_counter()
            for _ in range(CALLS_PER_TURN - 1):
                fns[k](batch)
            totals[k] += (time.perf_counter() - start) / (CALLS_PER_TURN - 1)
        if (i + 1) % max(1, len(x) // 10) == 0:
            log(f"batch-1 timing: {i + 1}/{len(x)} inputs")
    for point, total in zip(points, totals):
        point.ms_per_input = float(total / len(x) * 1e3)


def time_batch64(points: list[Point], x: np.ndarray, batches: int) -> None:
    """Inputs per second at batch 64, one thread, interleaved batch by batch (the first round untimed)."""
    fns = [callables(p, 64) for p in points]
    seconds = np.zeros(len(points))
    chunks = [x[i:i + 64] for i in range(0, min(len(x), 64 * (batches + 1)), 64) if len(x[i:i + 64]) == 64]
    for fn in fns:
        fn(chunks[0])
    for i, chunk in enumerate(chunks[1:]):
        for j in range(len(points)):
            k = (i + j) % len(points)
            start = time.perf_counter()
            fns[k](chunk)
            seconds[k] += time.perf_counter() - start
    for point, total in zip(points, seconds):
        point.inputs_per_s = float(64 * (len(chunks) - 1) / total)


def summary(points: list[Point]) -> dict:
    """Per precision: the static frontier and how each cascade point stands against it."""
    out = {}
    for precision in sorted({p.precision for p in points}):
        here = [p for p in points if p.precision == precision]
        static = sorted((p for p in here if p.kind == "static"), key=lambda p: p.ms_per_input)
        if not static:
            continue
        best = max(static, key=lambda p: p.accuracy)
        # the static frontier: the best accuracy a static network of at most this latency reaches, joined by lines
        line_ms = [s.ms_per_input for s in static]
        line_acc = np.maximum.accumulate([s.accuracy for s in static])
        rows = []
        for p in here:
            if p.kind == "static":
                continue
            cheaper = [s for s in static if s.ms_per_input <= p.ms_per_input]
            rows.append({
                "name": p.name, "target_drop": p.target_drop, "policy": p.policy, "accuracy": p.accuracy,
                "ms_per_input": p.ms_per_input, "shifted_accuracy": p.shifted_accuracy,
                "gain_over_static_at_latency": None if not cheaper else p.accuracy - max(s.accuracy for s in cheaper),
                "over_static_line": p.accuracy - float(np.interp(p.ms_per_input, line_ms, line_acc)),
                "reaches_best_static": p.accuracy >= best.accuracy,
                "latency_vs_best_static": p.ms_per_input / best.ms_per_input,
            })
        same_backbone = {s.backbone: s.accuracy for s in static}
        full_vs_static = {p.name: p.accuracy - same_backbone[p.backbone] for p in here
                          if p.kind == "early-exit-full" and p.backbone in same_backbone}
        out[precision] = {"static": [(s.name, s.accuracy, s.ms_per_input, s.shifted_accuracy) for s in static],
                          "best_static": best.name, "cascades": rows,
                          "full_onnx_minus_static_same_backbone": full_vs_static}
    return out


def plot(points: list[Point], path: Path) -> None:
    """Accuracy vs mean ms per input, one column per precision (clean test above, shifted test below); the static
    frontier as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    precisions = sorted({p.precision for p in points})
    fig, axes = plt.subplots(2, len(precisions), figsize=(6 * len(precisions), 9), squeeze=False)
    for row, (field_name, split) in enumerate((("accuracy", "test"), ("shifted_accuracy", "shifted test"))):
        for ax, precision in zip(axes[row], precisions):
            here = [p for p in points if p.precision == precision]
            static = sorted((p for p in here if p.kind == "static"), key=lambda p: p.ms_per_input)
            ax.plot([p.ms_per_input for p in static], [getattr(p, field_name) for p in static], "k-o", label="static family")
            for p in static:
                ax.annotate(p.name.split()[-1], (p.ms_per_input, getattr(p, field_name)), fontsize=7)
            for name in sorted({p.name for p in here if p.kind != "static"}):
                group = sorted((p for p in here if p.name == name), key=lambda p: p.ms_per_input)
                ax.plot([p.ms_per_input for p in group], [getattr(p, field_name) for p in group], "o--", label=name)
            ax.set_title(f"{precision}, {split}: batch 1, 1 thread")
            ax.set_xlabel("mean ms per input (measured)")
            ax.set_ylabel(f"{split} accuracy")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits, 2 epochs, few timed inputs: a path check")
    parser.add_argument("--data", default=None, help="data set (default: Fashion-MNIST npz, digits with --quick)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--work", default=None, help="folder for models and bundles (default: a folder under runs/)")
    parser.add_argument("--reuse", action="store_true", help="keep what --work already holds")
    parser.add_argument("--build-only", action="store_true", help="train, export, calibrate, quantize; no measurement "
                        "(then time on a quiet machine with --reuse)")
    parser.add_argument("--confidence-level", type=float, default=None,
                        help="calibrate every cascade with this --confidence-level (default: none, plain calibration)")
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/frontier[_quick].json)")
    args = parser.parse_args()
    setting = QUICK if args.quick else FULL
    if args.data or args.epochs:
        setting = Setting(**{**asdict(setting), "data": args.data or setting.data, "epochs": args.epochs or setting.epochs})
    tag = "frontier_quick" if args.quick else "frontier"
    work = Path(args.work or ROOT / "runs" / tag)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    bundles = build(setting, work, args.reuse)
    points = [p for name, kind, bundle in bundles
              for p in operating_points(name, kind, bundle, setting, args.reuse, args.confidence_level)]
    if args.build_only:
        log(f"built {len(points)} points in {(time.time() - started) / 60:.1f} min; measure with --reuse")
        return
    spec = load_manifest(bundles[0][2], check_hashes=False).input_spec
    x, y = load_eval_data(setting.data, "test", spec)
    x_shifted = shifted(x, spec.mean, spec.std)
    log(f"evaluating {len(points)} points on {len(x)} test inputs, clean and shifted")
    for p in points:
        p.accuracy, p.relative_macs, p.exit_counts = evaluate(p, x, y)
        p.shifted_accuracy, p.shifted_relative_macs, p.shifted_exit_counts = evaluate(p, x_shifted, y)
    rng = np.random.default_rng(0)
    sample = x[rng.permutation(len(x))[: setting.timing_inputs]]
    log(f"timing {len(points)} graphs at batch 1 on {len(sample)} inputs (interleaved)")
    time_batch1(points, sample)
    log("timing at batch 64")
    time_batch64(points, x, setting.throughput_batches)
    result = {"setting": asdict(setting), "confidence_level": args.confidence_level, "split": "test (calibrated on val)",
              "test_inputs": int(len(x)),
              "minutes": (time.time() - started) / 60, "summary": summary(points),
              "points": [{**asdict(p), "bundle": Path(p.bundle).name} for p in points]}  # bundle folders in --work
    out = Path(args.out or RESULTS / f"{tag}.json")
    write_json_atomic(out, result)
    plot(points, out.with_suffix(".png"))
    for precision, entry in result["summary"].items():
        print(f"{precision}: static {[(n, round(a, 4), round(ms, 3), round(sa, 4)) for n, a, ms, sa in entry['static']]}")
        for row in entry["cascades"]:
            gain = row["gain_over_static_at_latency"]
            print(f"  {row['name']:<32} drop {row['target_drop']} {row['policy'] or '':<18} acc {row['accuracy']:.4f} "
                  f"{row['ms_per_input']:.3f} ms  shifted {row['shifted_accuracy']:.4f}  gain {'-' if gain is None else f'{gain * 100:+.2f}'} pts  "
                  f"line {row['over_static_line'] * 100:+.2f} pts  "
                  f"x{row['latency_vs_best_static']:.2f} of best static{' (reaches it)' if row['reaches_best_static'] else ''}")
    log(f"wrote {out} ({result['minutes']:.1f} min)")


if __name__ == "__main__":
    main()
