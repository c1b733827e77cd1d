"""Training-side entry points behind the CLI: train, cuts, demo."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from edgeexit.errors import ConfigError
from edgeexit.train.backbones import build_backbone
from edgeexit.train.config import TrainSpec
from edgeexit.train.cuts import CutGraph
from edgeexit.train.data import training_splits
from edgeexit.train.hardware import training_env
from edgeexit.train.methods import get_method
from edgeexit.train.models import read_checkpoint, save_model
from edgeexit.train.placement import SCHEMES, check_exit_count, place_exits, scheme_targets
from edgeexit.train.pretrained import STATIC_METHOD
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


def train(spec: TrainSpec, out: str = "model.pt", progress: bool = True) -> TrainResult:
    """Build, train and save a model as `spec` says; returns the kept epoch's validation figures and the model.

    `spec.weights` loads the backbone from a local file first (PTEENet post-trains a frozen,
    pre-trained backbone and refuses to start without it); `branch_channels` and
    `branch_depth` size the conv branches of exit type "branch"; `beta` (one value, or one
    per exit) sets class exclusion's dynamic threshold. model.pt records the resolved spec
    (the method's loss, the measured augmentation default, ...). Launched by torchrun, every
    process trains its share of each batch and only rank 0 writes `out`.
    """
    spec.check()
    method = get_method(spec.method)
    if method.frozen_backbone and not spec.weights:
        raise ConfigError(f"--method {spec.method} post-trains a frozen backbone: pass its pre-trained weights with --weights FILE")
    if method.frozen_backbone and spec.schedule == "mixed":
        raise ConfigError(f"--schedule mixed trains the backbone first; --method {spec.method} keeps it frozen: use joint")
    spec = replace(spec, exit_type=spec.exit_type or method.exit_type, loss=spec.loss or method.loss,
                   distill=method.distill if spec.distill is None else spec.distill,
                   num_exits=spec.num_exits or method.num_exits, placement=spec.placement or method.placement,
                   warmup_loss=method.warmup_loss)
    exit_args = {k: v for k, v in (("channels", spec.branch_channels), ("depth", spec.branch_depth)) if v is not None}
    with training_env(spec.device, spec.precision) as env:
        torch.manual_seed(spec.seed)
        splits, spec = training_splits(spec)
        spec = spec.with_optimizer(len(splits.train), method.head_lr_scale)
        model = build_model(splits, spec.backbone, spec.exit_type, spec.placement, spec.num_exits,
                            exit_at=_split_list(spec.exit_at), method=spec.method, threshold=spec.threshold,
                            exit_args=exit_args, weights=spec.weights, backbone_args=spec.backbone_args,
                            policy_args=None if spec.beta is None else {"beta": spec.beta},
                            measure_cuts=_latency_placement() if spec.placement_cost == "latency" else None)
        history = train_model(model, splits, spec, progress=progress, env=env)
        if env.is_main:
            save_model(model, out, extra={"train": spec.to_dict(), "history": vars(history), "backbone_weights": spec.weights,
                                          "world_size": env.world_size})
    best = history.best_epoch
    return TrainResult(env.rank, model.config.cuts, best, history.val_accuracy[best], history.val_exit_rate[best], model, splits)


def _latency_placement() -> Callable:
    """The export side's measured cut latency (it exports each prefix: onnx is imported only when asked for)."""
    from edgeexit.export.cut_latency import measured_candidates

    return measured_candidates


def describe_cuts(backbone: str, input_size: int, channels: int | None, num_exits: int, profile: bool = False,
                  threads: int = 1, batch_size: int = 1, repeats: int = 50,
                  progress: Callable[[str], None] = lambda m: None) -> list[str]:
    """Lines listing candidate cut points, cumulative MACs, and each placement scheme's targets and picks.

    With `profile`, each cut's prefix graph is exported and timed on onnxruntime: the lines add
    its cumulative latency and latency fraction, and the schemes place by latency."""
    from edgeexit.export.cut_latency import cut_latencies, latency_candidates

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


def model_record(path: str | Path) -> dict[str, Any]:
    """What model.pt records besides its weights: the model's config, the resolved training spec, the history."""
    data = read_checkpoint(path)
    extra = data.get("extra") or {}
    return {"config": data["config"], "train": extra.get("train") or {}, "history": extra.get("history") or {}}


def describe_model(path: str | Path) -> list[str]:
    """Readable lines for `edgeexit info model.pt`: the model, and the recipe it was trained with."""
    record = model_record(path)
    config, spec, history = record["config"], record["train"], record["history"]
    lines = [f"model {path}: {config['method']} on {config['backbone']}, {config['num_classes']} classes, "
             f"input {list(config['input_shape'])}, exits at {', '.join(config['cuts'])}"]
    if spec:  # written by `edgeexit train`; a model saved from Python may have none
        get = lambda key: spec.get(key, "?")  # noqa: E731  (files from older versions lack the newer keys)
        flip = " + flip" if spec.get("flip") and spec.get("augment") not in (None, "none") else ""
        if config["method"] == STATIC_METHOD:  # `edgeexit pretrain`: no exit heads, cross-entropy, one-cycle
            training = f"{get('optimizer')} lr {get('lr')}, weight decay {get('weight_decay')}, one-cycle schedule"
        else:
            training = (f"{get('optimizer')} lr {get('lr')} (heads {get('head_lr')}), weight decay {get('weight_decay')}, "
                        f"schedule {get('schedule')}, loss {get('loss')} (warm-up {get('warmup_loss')} x {get('warmup_epochs')})")
        lines += [f"trained on {get('data')}: {get('epochs')} epochs, batch {get('batch_size')}, seed {get('seed')}",
                  f"recipe: {training}, augment {get('augment')}{flip}, label smoothing {get('label_smoothing')}"]
    best = history.get("best_epoch", -1)
    if history.get("val_accuracy") and best >= 0:
        lines.append(f"kept epoch {best + 1}: val accuracy {history['val_accuracy'][best]:.4f}")
    return lines


def demo(out: str, epochs: int = 8) -> dict[str, dict]:
    """Train resnet20 with EENets exits on digits, export, calibrate the thresholds on val for at most
    DEMO_TARGET_DROP points below the final classifier (written into the bundle), and compare on test the cascade
    at its default threshold and at the calibrated point with full.onnx, each on the engine `run` uses at batch 1."""
    from edgeexit.export import export_bundle
    from edgeexit.export.cascade_graph import rebuild_cascade
    from edgeexit.runtime.bundle import save_calibration
    from edgeexit.runtime.calibrate import calibrate, stderr_progress
    from edgeexit.runtime.cascade import CascadeRunner
    from edgeexit.runtime.datasets import load_eval_data
    from edgeexit.runtime.files import write_json_atomic
    from edgeexit.runtime.graph import open_runner
    from edgeexit.runtime.report import full_report, run_report

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    bundle = root / "bundle"
    train(replace(DEMO_TRAINING, epochs=epochs), out=str(root / "model.pt"))
    export_bundle(root / "model.pt", bundle)
    runner = open_runner(bundle, "auto", batch_size=1, threads=1)
    x, y = load_eval_data(DEMO_TRAINING.data, "test", runner.manifest.input_spec)
    default, _ = run_report(runner, x, y, batch_size=1)
    full = full_report(runner, x, y, batch_size=1)
    x_val, y_val = load_eval_data(DEMO_TRAINING.data, "val", runner.manifest.input_spec)
    record = calibrate(CascadeRunner(bundle, threads=1), x_val, y_val, ("target_drop", DEMO_TARGET_DROP),
                       {"name": DEMO_TRAINING.data, "split": "val"}, stderr_progress)
    if not save_calibration(bundle, record).cascades:  # the calibration changed what the graphs compile in
        rebuild_cascade(bundle, x_val)
    calibrated, _ = run_report(open_runner(bundle, "auto", batch_size=1, threads=1), x, y, batch_size=1)
    calibrated = {**calibrated, "target_drop": DEMO_TARGET_DROP, "val_accuracy": record["chosen"]["accuracy"]}
    write_json_atomic(root / "report.json", {**default, "full_onnx": full, "calibrated": calibrated})
    return {"full.onnx": full, "cascade (T=%.2g)" % default["thresholds"][0]: default, "calibrated (val)": calibrated}


DEMO_TARGET_DROP = 0.5  # accuracy points below the final classifier on val: the demo's calibrated operating point
# Plain exits + loss v4: measured on digits (8 epochs), T from 0.05 to 0.99 gives 12 distinct exit mixes, accuracy
# 0.985 -> 0.993 at 0.25 -> 0.97 relative MACs; with v2 every confidence logit sat at 50-93 and all inputs left at exit 0.
# Measured without augmentation, which it keeps.
DEMO_TRAINING = TrainSpec(backbone="resnet20", method="eenet", exit_type="plain", num_exits=2, placement="pareto", loss="v4",
                          augment="none")
