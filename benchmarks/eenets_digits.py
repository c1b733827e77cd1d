"""EENets on digits: every exit type x loss, trained seeded, exported and run on the runtime.

Writes benchmarks/results/eenets_digits.json and .png: accuracy, relative MACs (measured by
the cascade runtime from the manifest's MACs) and the exit histogram of each configuration,
next to the same backbone trained without exits. Wall-clock latencies are included but were
taken on a shared machine: treat them as noisy.

    python benchmarks/eenets_digits.py                      # EENet-8 (4 filters), 16x16, 20 epochs
    python benchmarks/eenets_digits.py --backbone resnet20 --exit-at "" --placement pareto
"""
from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from edgeexit.train.backbones import build_backbone
from edgeexit.train.config import TrainSpec
from edgeexit.train.data import DataSplits, load_data
from edgeexit.export import export_bundle
from edgeexit.train.methods import get_method
from edgeexit.train.models import save_model
from edgeexit.runtime.cascade import CascadeRunner
from edgeexit.runtime.datasets import load_eval_data
from edgeexit.runtime.files import write_json_atomic
from edgeexit.runtime.report import full_report, run_report
from edgeexit.train.assembly import build_model
from edgeexit.train.hardware import seed_everything
from edgeexit.train.trainer import train_model

EXIT_TYPES = ("plain", "pool", "bnpool")
LOSSES = ("v1", "v2")
RESULTS = Path(__file__).parent / "results"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="eenet8")
    parser.add_argument("--width", type=int, default=4, help="eenet8 filters (the paper uses 2 and 4)")
    parser.add_argument("--input-size", type=int, default=16)
    parser.add_argument("--exit-at", default="block1,block2", help="explicit cuts ('' = use --placement)")
    parser.add_argument("--placement", default="pareto")
    parser.add_argument("--num-exits", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "eenets_digits")
    return parser.parse_args()


def backbone_args(args: argparse.Namespace) -> dict:
    """Constructor arguments of the benchmarked backbone (EENet-8's width)."""
    return {"width": args.width} if args.backbone == "eenet8" else {}


def train_without_exits(data: DataSplits, backbone: str, net_args: dict, config: TrainSpec) -> float:
    """Test accuracy of the plain backbone trained alone with cross-entropy (the trainer's optimizer)."""
    seed_everything(config.seed)
    net = build_backbone(backbone, data.info.num_classes, data.info.input_shape[0], **net_args)
    loader = DataLoader(data.train, batch_size=config.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(config.seed))
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * len(loader))
    net.train()
    for _ in range(config.epochs):
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    net.eval()
    with torch.no_grad():
        x, y = next(iter(DataLoader(data.test, batch_size=len(data.test))))
        return float((net(x).argmax(1) == y).float().mean())


def run_config(data: DataSplits, args: argparse.Namespace, exit_type: str, loss: str, work: Path) -> dict:
    """Train one exit type x loss, export it to a verified bundle and measure it on the runtime."""
    exit_at = [c for c in args.exit_at.split(",") if c] or None
    model = build_model(data, args.backbone, exit_type, args.placement, args.num_exits, exit_at=exit_at,
                        backbone_args=backbone_args(args))
    # the recipe of `edgeexit train --method eenet`: its warm-up epoch(s), then the joint loss
    config = TrainSpec(epochs=args.epochs, loss=loss, lam=args.lam, seed=args.seed, optimizer="adamw",
                         warmup_loss=get_method("eenet").warmup_loss)
    start = time.perf_counter()
    history = train_model(model, data, config, progress=False)
    train_s = time.perf_counter() - start
    save_model(model, work / "model.pt")
    export_bundle(work / "model.pt", work / "bundle")
    runner = CascadeRunner(work / "bundle", device="cpu", threads=1)
    x, y = load_eval_data("digits", "test", runner.manifest.input_spec)
    cascade, _ = run_report(runner, x, y, batch_size=1)
    full = full_report(runner, x, y, batch_size=1)
    counts = cascade["exit_counts"]
    return {
        "exit_type": exit_type,
        "loss": loss,
        "cuts": model.config.cuts,
        "exit_costs": [round(c, 4) for c in model.exit_costs()],
        "accuracy": cascade["accuracy"],
        "relative_macs": cascade["relative_macs"],
        "exit_counts": counts,
        "dead_exits": [i for i, c in enumerate(counts[:-1]) if c == 0],
        "final_classifier_accuracy": full["accuracy"],
        "latency_ms_p50": {"cascade": cascade["latency_ms"]["p50"], "full": full["latency_ms"]["p50"]},
        "val_accuracy": history.val_accuracy[-1],
        "train_seconds": round(train_s, 1),
        "warmup": f"{config.warmup_epochs} epoch(s) of {config.warmup_loss}" if config.warmup_loss else None,
    }


def plot(results: dict, path: Path) -> None:
    """Table (accuracy, relative MACs, exit counts) and the exit histograms, one bar group per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["configs"]
    fig, (table_ax, hist_ax) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1.1, 1]})
    table_ax.axis("off")
    cells = [["no exits", "-", f"{results['baseline']['accuracy']:.3f}", "1.000", "-"]]
    cells += [[r["exit_type"], r["loss"], f"{r['accuracy']:.3f}", f"{r['relative_macs']:.3f}",
               " / ".join(map(str, r["exit_counts"]))] for r in rows]
    table = table_ax.table(cellText=cells, colLabels=["exit type", "loss", "accuracy", "rel. MACs", "exits (e0/e1/final)"],
                           loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.5)
    table_ax.set_title(f"{results['setup']['backbone']} on digits test ({results['setup']['samples']} images)")
    width = 0.8 / len(rows)
    num_stages = len(rows[0]["exit_counts"])
    for i, r in enumerate(rows):
        share = [c / sum(r["exit_counts"]) for c in r["exit_counts"]]
        hist_ax.bar([s + (i - len(rows) / 2 + 0.5) * width for s in range(num_stages)], share, width,
                    label=f"{r['exit_type']} {r['loss']}", hatch="//" if r["loss"] == "v1" else None)
    hist_ax.set_xticks(range(num_stages), [f"exit {s}" for s in range(num_stages - 1)] + ["final"])
    hist_ax.set_ylabel("share of test inputs")
    hist_ax.set_title("exit histogram (T = 0.5)")
    hist_ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    data = load_data("digits", input_size=args.input_size)
    baseline_config = TrainSpec(epochs=args.epochs, seed=args.seed)
    results = {
        "setup": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  "samples": len(data.test), "threshold": 0.5,
                  "note": "latencies from a shared, loaded 2-core machine: noisy"},
        "baseline": {"accuracy": train_without_exits(data, args.backbone, backbone_args(args), baseline_config),
                     "relative_macs": 1.0},
        "configs": [],
    }
    for exit_type, loss in itertools.product(EXIT_TYPES, LOSSES):
        with tempfile.TemporaryDirectory() as work:
            row = run_config(data, args, exit_type, loss, Path(work))
        results["configs"].append(row)
        print(f"{exit_type:<7}{loss:<4} acc {row['accuracy']:.3f}  rel MACs {row['relative_macs']:.3f}  "
              f"exits {row['exit_counts']}  ({row['train_seconds']} s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out.with_suffix(".json"), results)
    plot(results, args.out.with_suffix(".png"))
    print(f"baseline (no exits) acc {results['baseline']['accuracy']:.3f}; wrote {args.out}.json/.png")


if __name__ == "__main__":
    main()
