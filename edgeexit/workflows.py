"""Training-side entry points behind the CLI: train, cuts, demo, and torchvision evaluation data."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader

from edgeexit.errors import ConfigError
from edgeexit.runtime.manifest import InputSpec
from edgeexit.train.backbones import build_backbone
from edgeexit.train.config import TrainConfig
from edgeexit.train.cuts import CutGraph
from edgeexit.runtime.datasets import ALL_SPLIT, DATASETS, SPLITS
from edgeexit.train.data import load_data, load_torchvision_data
from edgeexit.train.hardware import training_env
from edgeexit.train.methods import get_method
from edgeexit.train.models import save_model
from edgeexit.train.placement import SCHEMES, check_exit_count, place_exits, scheme_targets
from edgeexit.train.assembly import build_model
from edgeexit.train.trainer import train_model


@dataclass(frozen=True)
class TrainResult:
    """What `train` hands back: the kept epoch's validation figures, and the trained model with its data."""

    rank: int  # this process's rank (0 writes model.pt)
    cuts: list[str]
    best_epoch: int  # 0-based index of the kept (lowest validation loss) epoch
    val_accuracy: float
    val_exit_rate: float  # share of validation inputs leaving early at the model's default threshold
    model: Any  # EarlyExitModel, in eval mode on the CPU
    data: Any  # DataSplits


def _split_list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def train(
    data: str = "digits",
    data_dir: str | None = None,
    download: bool = False,
    input_size: int | None = None,
    backbone: str = "resnet20",
    method: str = "eenet",
    exit_type: str | None = None,
    num_exits: int = 2,
    placement: str = "pareto",
    placement_cost: str = "macs",
    exit_at: str | None = None,
    loss: str | None = None,
    lam: float = 1.0,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 3e-3,
    head_lr: float | None = None,
    warmup_epochs: int = 1,
    threshold: float | None = None,
    seed: int = 0,
    out: str = "model.pt",
    progress: bool = True,
    weights: str | None = None,
    branch_channels: int | None = None,
    branch_depth: int | None = None,
    beta: float | list[float] | None = None,
    device: str = TrainConfig.device,
    precision: str = TrainConfig.precision,
    num_workers: int = TrainConfig.num_workers,
    checkpoint_dir: str | None = TrainConfig.checkpoint_dir,
    resume: bool = TrainConfig.resume,
) -> TrainResult:
    """Build, train and save a model; returns the kept epoch's validation figures and the model.

    `weights` loads the backbone from a local file first (PTEENet post-trains a frozen,
    pre-trained backbone and refuses to start without it); `branch_channels` and
    `branch_depth` size the conv branches of exit type "branch"; `beta` (one value, or one
    per exit) sets class exclusion's dynamic threshold. Launched by torchrun, every
    process trains its share of each batch and only rank 0 writes `out`.
    """
    if epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs}")
    spec = get_method(method)
    if spec.frozen_backbone and not weights:
        raise ConfigError(f"--method {method} post-trains a frozen backbone: pass its pre-trained weights with --weights FILE")
    if num_workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {num_workers}")
    if resume and not checkpoint_dir:
        raise ConfigError("--resume needs --checkpoint-dir DIR (where the checkpoint is)")
    exit_args = {k: v for k, v in (("channels", branch_channels), ("depth", branch_depth)) if v is not None}
    config = TrainConfig(data=data, data_dir=data_dir, download=download, epochs=epochs, batch_size=batch_size,
                         lr=lr, loss=loss or spec.loss, lam=lam, seed=seed, warmup_epochs=warmup_epochs,
                         warmup_loss=spec.warmup_loss, num_workers=num_workers, device=device, precision=precision,
                         checkpoint_dir=checkpoint_dir, resume=resume)
    config.head_lr = head_lr if head_lr is not None else spec.head_lr
    with training_env(device, precision) as env:
        torch.manual_seed(seed)
        splits = load_data(data, data_dir=data_dir, download=download, input_size=input_size)
        model = build_model(splits, backbone, exit_type or spec.exit_type, placement, num_exits,
                            exit_at=_split_list(exit_at), method=method, threshold=threshold, exit_args=exit_args,
                            weights=weights, policy_args=None if beta is None else {"beta": beta},
                            placement_cost=placement_cost)
        history = train_model(model, splits, config, progress=progress, env=env)
        if env.is_main:
            save_model(model, out, extra={"train": vars(config), "history": vars(history), "backbone_weights": weights,
                                          "world_size": env.world_size})
    best = history.best_epoch
    return TrainResult(env.rank, model.config.cuts, best, history.val_accuracy[best], history.val_exit_rate[best], model, splits)


def eval_arrays(name: str, split: str, input_spec: InputSpec, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A torchvision data set split (or "all" three) as the bundle's model-ready arrays: resized to its input size, converted
    to its channel count and normalized with its mean/std (InputSpec.preprocess), never the set's own table."""
    if split not in (*SPLITS, ALL_SPLIT):
        raise ConfigError(f"unknown split '{split}'; choose from: {', '.join(SPLITS)}, {ALL_SPLIT}")
    if DATASETS.resolve(name)[0].torchvision is None:
        raise ConfigError(f"data set '{name}' is not a torchvision set")
    splits = load_torchvision_data(name, data_dir, download=False, input_size=input_spec.sample_shape[1], normalized=False)
    dataset = ConcatDataset([getattr(splits, s) for s in SPLITS]) if split == ALL_SPLIT else getattr(splits, split)
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in DataLoader(dataset, batch_size=512)])
    return input_spec.preprocess(np.concatenate(xs)), np.concatenate(ys)


def describe_cuts(backbone: str, input_size: int, channels: int | None, num_exits: int, profile: bool = False,
                  threads: int = 1, batch_size: int = 1, repeats: int = 50,
                  progress: Callable[[str], None] = lambda m: None) -> list[str]:
    """Lines listing candidate cut points, cumulative MACs, and each placement scheme's targets and picks.

    With `profile`, each cut's prefix graph is exported and timed on onnxruntime: the lines add
    its cumulative latency and latency fraction, and the schemes place by latency."""
    from edgeexit.train.cut_latency import cut_latencies, latency_candidates

    channels = channels or (1 if backbone.startswith(("resnet", "eenet")) else 3)
    net = build_backbone(backbone, 10, channels)
    graph = CutGraph(net, (channels, input_size, input_size))
    check_exit_count(num_exits, graph.candidates)
    candidates = graph.candidates
    latency_columns = ""
    if profile:
        latencies, full = cut_latencies(graph, threads, batch_size, repeats, progress)
        candidates = latency_candidates(candidates, latencies, full)
        latency_columns = f"{'cum. ms p50':>12}{'p95':>9}{'ms fraction':>12}"
    picks: dict[str, list[str]] = {}
    schemes = []
    for scheme in SCHEMES:
        targets = ", ".join(f"{t:.3f}" for t in scheme_targets(scheme, num_exits))
        try:
            points, why = [p.name for p in place_exits(scheme, num_exits, candidates)], ""
        except ConfigError as exc:
            points, why = [], f"none ({str(exc).split(': ', 1)[1]})"
        for name in points:
            picks.setdefault(name, []).append(scheme)
        schemes.append(f"  {scheme:<10} targets {targets} -> {', '.join(points) or why}")
    lines = [f"{backbone} at {channels}x{input_size}x{input_size}: {graph.full_macs / 1e6:.2f} MMACs, "
             f"{len(graph.candidates)} cut points (schemes pick {num_exits} exits)"]
    if profile:
        lines.append(f"measured on onnxruntime CPU, {threads} thread(s), batch {batch_size}: whole backbone p50 "
                     f"{full.p50:.3f} ms, p95 {full.p95:.3f} ms")
    lines.append(f"{'cut point':<22}{'feature shape':<16}{'cum. MMACs':>11}{'fraction':>10}{latency_columns}  schemes")
    for point, placed in zip(graph.candidates, candidates):
        shape = "x".join(map(str, point.shape))
        measured = ""
        if profile:
            measured = f"{latencies[point.name].p50:>12.3f}{latencies[point.name].p95:>9.3f}{placed.fraction:>12.3f}"
        lines.append(f"{point.name:<22}{shape:<16}{point.cumulative_macs / 1e6:>11.2f}{point.fraction:>10.3f}{measured}  "
                     f"{', '.join(picks.get(point.name, []))}")
    cost = "measured latency fraction" if profile else "fraction"
    lines.append(f"schemes (exit i at the first cut point after exit i-1 whose {cost} reaches target i):")
    return lines + schemes


def demo(out: str, epochs: int = 8) -> dict[str, dict]:
    """Train resnet20 with EENets exits on digits, export, and compare cascade vs full.onnx."""
    from edgeexit.export import export_bundle
    from edgeexit.runtime.cascade import CascadeRunner
    from edgeexit.runtime.datasets import load_eval_data
    from edgeexit.runtime.manifest import write_json_atomic
    from edgeexit.runtime.report import full_report, run_report

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    train(epochs=epochs, out=str(root / "model.pt"), **DEMO_TRAINING)
    export_bundle(root / "model.pt", root / "bundle")
    runner = CascadeRunner(root / "bundle", device="cpu", threads=1)
    x, y = load_eval_data("digits", "test", runner.manifest.input_spec)
    cascade, _ = run_report(runner, x, y, batch_size=1)
    full = full_report(runner, x, y, batch_size=1)
    report = {**cascade, "full_onnx": full}
    write_json_atomic(root / "report.json", report)
    return {"full.onnx": full, "cascade (T=%.2g)" % runner.thresholds[0]: cascade}


# Plain exits + loss v4: measured on digits (8 epochs), T from 0.05 to 0.99 gives 12 distinct exit mixes, accuracy
# 0.985 -> 0.993 at 0.25 -> 0.97 relative MACs; with v2 every confidence logit sat at 50-93 and all inputs left at exit 0.
DEMO_TRAINING: dict[str, Any] = {
    "backbone": "resnet20",
    "method": "eenet",
    "exit_type": "plain",
    "num_exits": 2,
    "placement": "pareto",
    "loss": "v4",
    "lam": 1.0,
}
