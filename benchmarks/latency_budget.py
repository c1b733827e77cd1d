"""Latency, not MACs: predicted vs measured cascade latency, and latency- vs MACs-calibrated cascades at equal budgets.

Data: Fashion-MNIST from an .npz (x uint8 (N, 28, 28), y, classes), by default the 60,000-image
copy at ../shared/data/fashion-mnist-60k.npz beside the repository, read as `--data npz:PATH`
(edgeexit's fixed seeded 70/15/15 split of the file, NOT the official train/test split; the
first --val-size / --test-size images of val and test). --bundle uses an existing bundle
trained on that split (e.g. `python benchmarks/fashion_mnist.py --headline --out DIR` ->
DIR/bundle); without it, one is trained on the file's whole train split.

(a) Prediction: the bundle is calibrated on val, profiled (`edgeexit profile`) at batch 1 and 64
    with --threads, then the cascade runs over the test split (tiled to --samples inputs); the
    mean latency per input the profile predicts from the run's exit histogram is set against the
    measured one (goal: within 10%).
(b) Budgets: for each latency budget (ms per call at batch 1, p50 by default), the cascade is
    calibrated on val twice: by latency (`calibrate --latency-budget B --profile P`) and by MACs
    with the budget turned into a MACs fraction the way a MACs planner would (B / full.onnx p50,
    i.e. latency taken proportional to MACs). Both run on test: accuracy, measured mean latency,
    and whether it stays within the budget.

    python benchmarks/latency_budget.py                  # -> benchmarks/results/latency_budget.{json,png}
    python benchmarks/latency_budget.py --quick          # a few-minute check of the whole path
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from edgeexit import workflows
from edgeexit.train.config import TrainSpec
from edgeexit.export import export_bundle
from edgeexit.runtime.calibrate import LatencyTarget, calibrate, stderr_progress
from edgeexit.runtime.bundle import save_calibration
from edgeexit.runtime.cascade import CascadeRunner
from edgeexit.runtime.datasets import load_eval_data
from edgeexit.runtime.graph import auto_engine, open_runner
from edgeexit.runtime.latency import DEFAULT_PERCENTILE, PERCENTILES, budget_latency, budget_stat, cheapest_latency, matching_profile
from edgeexit.runtime.manifest import load_manifest
from edgeexit.runtime.files import write_json_atomic
from edgeexit.runtime.profile import measure_profile
from edgeexit.runtime.bundle import save_profile
from edgeexit.runtime.report import run_report

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
DEFAULT_NPZ = ROOT.parent.parent / "shared" / "data" / "fashion-mnist-60k.npz"
TRAINING = {"method": "eenet", "exit_type": "plain", "num_exits": 2, "placement": "pareto", "loss": "v2"}


def tiled(x: np.ndarray, y: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n inputs of x repeated as needed."""
    reps = -(-n // len(x))
    return np.concatenate([x] * reps)[:n], np.concatenate([y] * reps)[:n]


def prediction_check(bundle: Path, data: str, threads: int, batch: int, samples: int, repeats: int, engine: str) -> dict:
    """Profile `engine` at `batch`, run the calibrated cascade on test, compare predicted and measured mean ms per input."""
    profile = measure_profile(open_runner(bundle, engine, batch_size=batch, threads=threads), batch, repeats, stderr_progress)
    save_profile(str(bundle), profile)
    runner = open_runner(bundle, engine, batch_size=batch, threads=threads)
    x, y = tiled(*load_eval_data(data, "test", runner.manifest.input_spec), samples)
    report, _ = run_report(runner, x, y, batch)
    predicted, measured = report["predicted_latency_ms"], report["measured_latency_ms"]
    stderr_progress(f"{engine} batch {batch}: predicted {predicted:.4f} ms/input, measured {measured:.4f} "
                    f"({predicted / measured - 1:+.1%})")
    return {"engine": engine, "batch_size": batch, "threads": threads, "profile": profile.key,
            "exit_counts": report["exit_counts"], "predicted_ms_per_input": predicted, "measured_ms_per_input": measured,
            "relative_error": predicted / measured - 1, "within_10pct": abs(predicted / measured - 1) <= 0.10,
            "full_onnx_p50_ms": profile.full.p50}


def budget_row(bundle: Path, data: str, threads: int, budget: float, percentile: str, val: tuple, test: tuple,
               engine: str) -> dict:
    """Calibrate by latency and by the MACs proxy at one budget (as `edgeexit calibrate` writes it into the bundle);
    run both with `engine` on test (batch 1). The budget bounds the mean ms per input or a percentile per call."""
    manifest = load_manifest(bundle)
    profile = matching_profile(manifest, "cpu", threads, 1, engine)
    target = LatencyTarget(profile, percentile)
    stat, _ = budget_stat(percentile)
    macs_fraction = min(1.0, budget / profile.full.stat(stat))
    row = {"budget_ms": budget, "macs_budget": macs_fraction}
    for label, objective in (("latency", ("latency", budget)), ("macs", ("budget", macs_fraction))):
        record = calibrate(CascadeRunner(bundle, threads=threads), *val, objective, {"name": data, "split": "val"},
                           latency=target)
        save_calibration(str(bundle), record)
        report, _ = run_report(open_runner(bundle, engine, batch_size=1, threads=threads), *test, 1)
        p = report["latency_ms"][stat]
        row[label] = {
            "thresholds": record["chosen"]["thresholds"], "val_accuracy": record["chosen"]["accuracy"],
            "val_predicted_ms": record["chosen"]["predicted_latency_ms"], "test_accuracy": report["accuracy"],
            "test_predicted_ms": budget_latency(profile, report["exit_counts"], percentile), "test_measured_ms": p,
            "relative_macs": report["relative_macs"], "exit_counts": report["exit_counts"],
            "meets_budget": p <= budget,
        }
        stderr_progress(f"budget {budget:.3f} ms ({target.label}) by {label}: test accuracy {report['accuracy']:.4f}, "
                        f"measured {p:.3f} ms")
    return row


def plot(results: dict, path: Path) -> None:
    """Left: predicted vs measured per batch size; right: test accuracy vs budget for both calibrations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    checks = results["prediction"]
    pos = np.arange(len(checks))
    left.bar(pos - 0.2, [c["predicted_ms_per_input"] for c in checks], 0.4, label="predicted (profile)")
    left.bar(pos + 0.2, [c["measured_ms_per_input"] for c in checks], 0.4, label="measured")
    left.set_xticks(pos, [f"{c['engine']} b{c['batch_size']}\n{c['relative_error']:+.1%}" for c in checks])
    left.set_ylabel("mean ms per input")
    left.legend()
    rows = results["budgets"]
    for label, marker in (("latency", "o-"), ("macs", "s--")):
        right.plot([r["budget_ms"] for r in rows], [r[label]["test_accuracy"] for r in rows], marker,
                   label=f"calibrated by {label}")
        for r in rows:
            if not r[label]["meets_budget"]:
                right.plot(r["budget_ms"], r[label]["test_accuracy"], "rx", markersize=10)
    right.set_xlabel(f"latency budget, {results['budget_bounds']} (batch 1); x = over budget on test")
    right.set_ylabel("test accuracy")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", type=Path, default=DEFAULT_NPZ)
    parser.add_argument("--bundle", type=Path, default=None, help="an existing Fashion-MNIST bundle (else train one)")
    parser.add_argument("--backbone", default="resnet20")
    parser.add_argument("--input-size", type=int, default=28)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--val-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=1280, help="test inputs (tiled) per prediction check")
    parser.add_argument("--repeats", type=int, default=200, help="profile repeats")
    parser.add_argument("--budgets", type=int, default=6, help="latency budgets between the cheapest exit and full.onnx")
    parser.add_argument("--percentile", default=DEFAULT_PERCENTILE, choices=PERCENTILES, help="what a budget bounds")
    parser.add_argument("--quick", action="store_true", help="small model and data: checks the path in minutes")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "edgeexit-latency-budget")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.backbone, args.input_size, args.epochs = "resnet8", 16, 2
        args.val_size, args.test_size, args.samples, args.repeats, args.budgets = 500, 500, 256, 40, 3
    if not args.npz.is_file():
        sys.exit(f"error: {args.npz} not found: pass --npz PATH to a Fashion-MNIST .npz (x, y, classes)")
    args.work.mkdir(parents=True, exist_ok=True)
    data = f"npz:{args.npz}"
    bundle = args.bundle
    if bundle is not None:  # calibrated and profiled below: work on a copy
        bundle = args.work / "bundle"
        shutil.rmtree(bundle, ignore_errors=True)
        shutil.copytree(args.bundle, bundle)
    else:
        model = args.work / f"{args.backbone}-{args.input_size}-e{args.epochs}.pt"
        bundle = model.with_suffix("")
        if not model.exists():
            stderr_progress(f"training {args.backbone} on {data} for {args.epochs} epochs")
            workflows.train(TrainSpec(data=data, backbone=args.backbone, input_size=args.input_size, epochs=args.epochs,
                                      **TRAINING), str(model), progress=False)
        export_bundle(model, bundle)
    spec = load_manifest(bundle).input_spec
    val = tuple(a[: args.val_size] for a in load_eval_data(data, "val", spec))
    test = tuple(a[: args.test_size] for a in load_eval_data(data, "test", spec))
    save_calibration(str(bundle), calibrate(CascadeRunner(bundle, threads=args.threads), *val, ("target_drop", 0.5),
                                             {"name": data, "split": "val"}, stderr_progress))
    engine = auto_engine(load_manifest(bundle))  # the one `edgeexit run` picks; the chain is checked as well
    prediction = [prediction_check(bundle, data, args.threads, batch, args.samples, args.repeats, name)
                  for name in dict.fromkeys([engine, "chain"]) for batch in (1, 64)]
    profile = matching_profile(load_manifest(bundle), "cpu", args.threads, 1, engine)
    low = cheapest_latency(profile, args.percentile)
    high = budget_latency(profile, [0] * (len(profile.exits) - 1) + [1], args.percentile)  # every input to the final stage
    budgets = [float(b) for b in np.linspace(low * 1.05, high, args.budgets)]
    rows = [budget_row(bundle, data, args.threads, b, args.percentile, val, test, engine) for b in budgets]
    results = {
        "settings": {**{k: v.name if isinstance(v, Path) else v for k, v in vars(args).items()}, "data": "npz: edgeexit's seeded 70/15/15 split, first N of val/test"},
        "bundle_cuts": [s.exit.cut for s in load_manifest(bundle).stages[:-1]],
        "budget_engine": engine,
        "budget_bounds": LatencyTarget(profile, args.percentile).label,
        "prediction": prediction,
        "budgets": rows,
        "latency_at_least_as_accurate": sum(r["latency"]["test_accuracy"] >= r["macs"]["test_accuracy"] for r in rows),
        "macs_over_budget": sum(not r["macs"]["meets_budget"] for r in rows),
        "latency_over_budget": sum(not r["latency"]["meets_budget"] for r in rows),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "latency_budget_quick" if args.quick else "latency_budget"
    write_json_atomic(args.out / f"{stem}.json", results)
    plot(results, args.out / f"{stem}.png")
    print("prediction: " + ", ".join(f"{c['engine']} batch {c['batch_size']} {c['relative_error']:+.1%}" for c in prediction))
    print(f"{'budget ms':>10}{'MACs frac':>10}{'acc lat':>9}{'acc MACs':>9}{'ms lat':>8}{'ms MACs':>8}")
    for r in rows:
        print(f"{r['budget_ms']:>10.3f}{r['macs_budget']:>10.3f}{r['latency']['test_accuracy']:>9.4f}"
              f"{r['macs']['test_accuracy']:>9.4f}{r['latency']['test_measured_ms']:>8.3f}{r['macs']['test_measured_ms']:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
