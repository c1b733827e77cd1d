"""fp32 vs int8 on a labeled data set (digits by default): accuracy of full.onnx and of the cascade at equal relative MACs, and latency.

From an exported fp32 bundle: calibrate its thresholds (its own policy) on --data's val split
(--target-drop), quantize it with `edgeexit quantize` (thresholds re-chosen for the fp32 bundle's
relative MACs on val), then on the test split: accuracy and relative MACs of both cascades, both full.onnx, and the
accuracy-vs-MACs curve of each (thresholds chosen on val for a range of MACs budgets). Latency:
full.onnx and cascade, fp32 and int8, timed interleaved in one run. Writes int8.json + int8.png.

    edgeexit demo --out demo/ && python benchmarks/int8.py --bundle demo/bundle --threads 1
    python benchmarks/int8.py --bundle DIR/bundle --data npz:../shared/data/fashion-mnist-60k.npz   # the Fashion headline
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path

from edgeexit.export.quantize import quantize_bundle
from edgeexit.runtime.bundle import save_calibration
from edgeexit.runtime.calibrate import calibrate, choose_thresholds
from edgeexit.runtime.cascade import CascadeRunner
from edgeexit.runtime.datasets import load_eval_data
from edgeexit.runtime.report import interleaved_timings, latency_stats
from edgeexit.runtime.simulate import CascadeSimulator

BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
RESULTS = Path(__file__).resolve().parent / "results"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def curve(runner: CascadeRunner, val: tuple, test: tuple) -> list[dict]:
    """Per MACs budget: thresholds chosen on val, accuracy and relative MACs on test (simulated)."""
    val_out, val_final = runner.stage_outputs(val[0])
    test_out, test_final = runner.stage_outputs(test[0])
    costs = runner.manifest.exit_costs()
    sim = CascadeSimulator(runner.policies, test_out, test_final, test[1], costs)
    points = []
    for budget in BUDGETS:
        chosen = choose_thresholds(runner.policies, val_out, val_final, val[1], costs, ("budget", budget))["chosen"]
        point = sim.evaluate(chosen["thresholds"])
        points.append({"budget": budget, "thresholds": list(point.thresholds), "accuracy": point.accuracy,
                       "relative_macs": point.relative_macs})
    return points


def evaluate(runner: CascadeRunner, test: tuple) -> dict:
    """Test accuracy of full.onnx and of the cascade at the bundle's thresholds."""
    x, y = test
    result = runner.predict(x)
    return {"full_accuracy": float((runner.predict_full(x).argmax(1) == y).mean()),
            "cascade_accuracy": float((result.predictions == y).mean()),
            "relative_macs": runner.relative_macs(result), "exit_counts": result.exit_counts(),
            "thresholds": runner.thresholds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, help="an exported fp32 bundle (not modified)")
    parser.add_argument("--data", default="digits", help="labeled data the bundle was trained on (digits, npz:PATH, folder:PATH)")
    parser.add_argument("--target-drop", type=float, default=0.5, help="fp32 thresholds: accuracy drop on val (points)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="int8-bench-"))
    try:
        fp32_path, int8_path = work / "fp32", work / "int8"
        shutil.copytree(args.bundle, fp32_path)
        spec = CascadeRunner(fp32_path).manifest.input_spec
        val, test = load_eval_data(args.data, "val", spec), load_eval_data(args.data, "test", spec)
        log(f"calibrating the fp32 thresholds on {args.data} val")
        save_calibration(str(fp32_path), calibrate(CascadeRunner(fp32_path), *val, ("target_drop", args.target_drop)))
        log("quantizing")
        quantize_bundle(fp32_path, int8_path, *val, data={"name": args.data, "split": "val"}, progress=log)
        runners = {name: CascadeRunner(path, threads=args.threads) for name, path in (("fp32", fp32_path), ("int8", int8_path))}
        report: dict = {"bundle": Path(args.bundle).name, "data": Path(args.data).name, "host": platform.machine(), "processor": platform.processor(),
                        "threads": args.threads, "batch_size": args.batch_size, "test_samples": int(len(test[1]))}
        for name, runner in runners.items():
            log(f"{name}: accuracy and curve")
            report[name] = {**evaluate(runner, test), "curve": curve(runner, val, test)}
        fns = {f"{name}_{kind}": fn for name, runner in runners.items()
               for kind, fn in (("full", runner.predict_full), ("cascade", runner.predict))}
        timed = interleaved_timings(fns, test[0], args.batch_size, progress=log, label="latency")
        report["latency_ms"] = {name: latency_stats(seconds) for name, (_, seconds) in timed.items()}
        lat = report["latency_ms"]
        report["int8_speedup"] = {kind: lat[f"fp32_{kind}"]["mean"] / lat[f"int8_{kind}"]["mean"] for kind in ("full", "cascade")}
        report["cascade_accuracy_drop_points"] = 100 * (report["fp32"]["cascade_accuracy"] - report["int8"]["cascade_accuracy"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "int8.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / "int8.png")
    for name in ("fp32", "int8"):
        r = report[name]
        print(f"{name}: full.onnx {r['full_accuracy']:.4f}; cascade {r['cascade_accuracy']:.4f} at relative MACs "
              f"{r['relative_macs']:.3f}; p50 full {lat[name + '_full']['p50']:.3f} ms, cascade {lat[name + '_cascade']['p50']:.3f} ms")
    print(f"int8 speedup: full {report['int8_speedup']['full']:.2f}x, cascade {report['int8_speedup']['cascade']:.2f}x; "
          f"wrote {out / 'int8.json'} and int8.png")


def plot(report: dict, path: Path) -> None:
    """Accuracy vs relative MACs (test) and p50 latency, fp32 vs int8."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, color in (("fp32", "tab:blue"), ("int8", "tab:orange")):
        pts = sorted(report[name]["curve"], key=lambda p: p["relative_macs"])
        left.plot([p["relative_macs"] for p in pts], [100 * p["accuracy"] for p in pts], "o-", color=color, label=f"{name} cascade")
        left.axhline(100 * report[name]["full_accuracy"], color=color, ls="--", lw=1, label=f"{name} full.onnx")
    left.set_xlabel("relative MACs (test)")
    left.set_ylabel(f"accuracy % ({report['data']} test)")
    left.legend(fontsize=8)
    names = list(report["latency_ms"])
    right.bar(names, [report["latency_ms"][n]["p50"] for n in names], color=["tab:blue", "tab:blue", "tab:orange", "tab:orange"])
    right.set_ylabel(f"p50 latency ms (batch {report['batch_size']}, {report['threads']} thread)")
    right.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
