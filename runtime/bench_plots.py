"""PNG plots of a bench report; matplotlib (the [train] extra) is imported only here, lazily."""
from __future__ import annotations

import os
from pathlib import Path

from edgeexit.extras import require

PLOTS = ("accuracy_vs_macs.png", "latency_vs_threshold.png", "exit_histogram.png")


def _pyplot():
    require("matplotlib", "bench plots").use("Agg")
    return require("matplotlib.pyplot", "bench plots")


def _accuracy_vs_macs(ax, report: dict) -> None:
    simulated = report["sweep"]["simulated"]
    if simulated:
        ax.plot([p["relative_macs"] for p in simulated], [p["accuracy"] for p in simulated], "-", color="0.6",
                label="shared threshold (simulated)")
    measured = [p for p in report["sweep"]["measured"] if p["accuracy"] is not None]
    ax.plot([p["relative_macs"] for p in measured], [p["accuracy"] for p in measured], "o", label="sweep (measured)")
    ax.plot([report["relative_macs"]], [report["accuracy"]], "*", markersize=14, label="manifest thresholds")
    ax.plot([1.0], [report["full_onnx"]["accuracy"]], "s", label="full.onnx")
    if "oracle" in report:
        ax.plot([report["oracle"]["relative_macs"]], [report["oracle"]["accuracy"]], "D", label="oracle (first correct exit)")
    ax.set_xlabel("relative MACs")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize="small")


def _latency_vs_threshold(ax, report: dict) -> None:
    measured = report["sweep"]["measured"]
    thresholds = [p["thresholds"][0] for p in measured]
    for key in ("p50", "p95"):
        ax.plot(thresholds, [p["latency_ms"][key] for p in measured], "o-", label=f"cascade {key}")
    ax.axhline(report["full_onnx"]["latency_ms"]["p50"], linestyle="--", color="k", label="full.onnx p50")
    ax.set_xlabel("threshold (exit 0; shared grid level)")
    ax.set_ylabel(f"latency per call (ms, batch {report['batch_size']})")
    ax.legend(fontsize="small")


def _exit_histogram(ax, report: dict) -> None:
    counts = report["exit_counts"]
    labels = [f"exit {i}" for i in range(len(counts) - 1)] + ["final"]
    ax.bar(labels, counts)
    ax.set_ylabel("inputs")
    ax.set_title(f"thresholds {', '.join(f'{t:.3g}' for t in report['cascade']['thresholds'])}")


def write_plots(report: dict, out: str | os.PathLike) -> list[Path]:
    """Write the three bench plots into `out`; returns their paths."""
    plt = _pyplot()
    out = Path(out)
    paths = []
    for name, draw in zip(PLOTS, (_accuracy_vs_macs, _latency_vs_threshold, _exit_histogram)):
        fig, ax = plt.subplots(figsize=(6, 4.2))
        draw(ax, report)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)
    return paths
