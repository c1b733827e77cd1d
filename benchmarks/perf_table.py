"""Reproduce the README performance table: digits, resnet20 and resnet56, batch 1 and 64, 1 and 2 threads.

For each backbone: train briefly (edgeexit.workflows.train; reused if model.pt exists), export,
calibrate on the val split for no accuracy drop (--target-drop), then `run_bench` on the
test split (tiled to --samples inputs so batch 64 has enough calls) for every batch size
and thread count. Writes benchmarks/results/perf_table.json and perf_table.png and prints
the markdown table for README.md.

    python benchmarks/perf_table.py                       # the published numbers (quiet machine)
    python benchmarks/perf_table.py --epochs 2 --input-size 16 --samples 128   # a quick smoke run
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from edgeexit import workflows
from edgeexit.train.config import TrainSpec
from edgeexit.train.eager import eager_predictor
from edgeexit.export import export_bundle
from edgeexit.runtime.bench import run_bench
from edgeexit.runtime.bundle import save_calibration
from edgeexit.runtime.calibrate import calibrate, stderr_progress
from edgeexit.runtime.cascade import CascadeRunner
from edgeexit.runtime.datasets import load_eval_data
from edgeexit.runtime.files import write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results"
TRAINING = {"data": "digits", "method": "eenet", "exit_type": "plain", "num_exits": 2, "placement": "pareto", "loss": "v2"}
COLUMNS = [
    ("backbone", "{}"), ("batch", "{}"), ("threads", "{}"),
    ("acc_full", "{:.4f}"), ("acc_cascade", "{:.4f}"), ("relative_macs", "{:.3f}"),
    ("full_ms", "{:.3f}"), ("cascade_ms", "{:.3f}"), ("no_exit_over_full", "{:.3f}"),
    ("speedup", "{:.2f}x"), ("macs_speedup", "{:.2f}x"), ("realized_over_predicted", "{:.2f}"),
    ("eager_over_ort", "{:.2f}x"),
]


def prepare(backbone: str, work: Path, epochs: int, input_size: int, target_drop: float) -> Path:
    """Train (unless model.pt exists), export and calibrate one backbone; returns the bundle folder."""
    model, bundle = work / f"{backbone}.pt", work / backbone
    if not model.exists():
        stderr_progress(f"training {backbone} for {epochs} epochs")
        workflows.train(TrainSpec(backbone=backbone, epochs=epochs, input_size=input_size, **TRAINING), str(model), progress=False)
    stderr_progress(f"exporting {backbone}")
    export_bundle(model, bundle)
    runner = CascadeRunner(bundle)
    x, y = load_eval_data("digits", "val", runner.manifest.input_spec)
    record = calibrate(runner, x, y, ("target_drop", target_drop), {"name": "digits", "split": "val"}, stderr_progress)
    save_calibration(bundle, record)
    return bundle


def row(backbone: str, report: dict) -> dict:
    """The table's numbers from one bench report (mean latency per call, ms)."""
    speed = report["speedup"]
    return {
        "backbone": backbone, "batch": report["batch_size"], "threads": report["threads"],
        "acc_full": report["full_onnx"]["accuracy"], "acc_cascade": report["accuracy"],
        "relative_macs": report["relative_macs"],
        "full_ms": report["full_onnx"]["latency_ms"]["mean"], "cascade_ms": report["latency_ms"]["mean"],
        "no_exit_over_full": speed["no_exit_over_full"], "speedup": speed["realized"],
        "macs_speedup": speed["macs_predicted"], "realized_over_predicted": speed["realized_over_predicted"],
        "eager_over_ort": speed.get("pytorch_eager_over_full_onnx", float("nan")),
    }


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt.format(r[name]) for name, fmt in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Bars of full.onnx vs cascade mean latency per configuration (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['backbone']}\nbs{r['batch']} t{r['threads']}" for r in rows]
    pos = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4.2))
    for offset, key, name in ((-0.2, "full_ms", "full.onnx"), (0.2, "cascade_ms", "cascade (calibrated)")):
        ax.bar(pos + offset, [r[key] for r in rows], width=0.4, label=name)
    ax.set_xticks(pos, labels, fontsize="small")
    ax.set_yscale("log")
    ax.set_ylabel("mean latency per call (ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="resnet20,resnet56")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=1280, help="test inputs (the split tiled) per configuration")
    parser.add_argument("--target-drop", type=float, default=0.0, help="calibration target, percentage points")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "edgeexit-perf-table"),
                        help="where models and bundles are kept (reused between runs)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    rows, reports = [], {}
    for backbone in args.backbones.split(","):
        bundle = prepare(backbone, work, args.epochs, args.input_size, args.target_drop)
        for threads in map(int, args.threads.split(",")):
            runner = CascadeRunner(bundle, threads=threads)
            x, y = load_eval_data("digits", "test", runner.manifest.input_spec)
            reps = -(-args.samples // len(x))
            x, y = np.concatenate([x] * reps)[: args.samples], np.concatenate([y] * reps)[: args.samples]
            eager = {"pytorch_eager": eager_predictor(work / f"{backbone}.pt", threads)}
            for batch in map(int, args.batch_sizes.split(",")):
                stderr_progress(f"bench {backbone} batch {batch} threads {threads}")
                report = run_bench(runner, x, y, batch, eager, sweep_points=0, progress=stderr_progress)
                reports[f"{backbone}/bs{batch}/t{threads}"] = report
                rows.append(row(backbone, report))
    write_json_atomic(out / "perf_table.json", {"settings": vars(args), "rows": rows, "reports": reports})
    plot(rows, out / "perf_table.png")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
