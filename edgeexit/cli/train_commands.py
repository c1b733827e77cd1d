"""Training-side commands (need the [train] extra, imported lazily): train, pretrain, export, static-batch,
quantize (these two need onnx only), cuts, demo."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import click

from edgeexit.cli.common import BETA_HELP, labeled_data_options, parse_numbers, training_extra
from edgeexit.cli.runtime_commands import _load_run_data as load_run_data
from edgeexit.errors import ConfigError
from edgeexit.runtime.datasets import DATASETS
from edgeexit.export.defaults import DEFAULT_OPSET
# augment and config need no torch: --help works without the [train] extra
from edgeexit.train.augment import AUGMENT_FROM_EPOCHS, AUGMENT_MEASURED_IMAGES, AUGMENTS, augment_from_epochs
from edgeexit.train.config import OPTIMIZERS, PLACEMENT_COSTS, PRETRAIN, SCHEDULES, SGD_FROM_IMAGES, TrainSpec

D = TrainSpec()  # every default of train (pretrain: PRETRAIN), read by the options below
def parse_json_object(value: str, option: str) -> dict[str, Any]:
    """A JSON object option (e.g. --backbone-args) as a dict; ConfigError otherwise."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{option} must be a JSON object, e.g. '{{\"width\": 4}}' ({exc.msg})") from None
    if not isinstance(parsed, dict):
        raise ConfigError(f"{option} must be a JSON object, got {type(parsed).__name__}")
    return parsed


BATCH_HELP = "Examples per step in each process; under torchrun the global batch is this times the process count."


def hardware_options(command: Any) -> Any:
    """--device, --precision and --workers, shared by train and pretrain."""
    options = [
        click.option("--device", default=D.device, show_default=True,
                     help="auto (cuda when available), cpu, cuda, cuda:N or mps. Under torchrun, cuda means cuda:LOCAL_RANK."),
        click.option("--precision", default=D.precision, show_default=True,
                     help="32, bf16 (autocast; CPUs and recent GPUs) or 16-mixed (autocast float16 + gradient scaling; GPUs). "
                          "Exported graphs are float32 either way."),
        click.option("--workers", "num_workers", type=int, default=D.num_workers, show_default=True,
                     help="DataLoader worker processes per training process (memory is pinned on CUDA)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def data_options(defaults: TrainSpec) -> Any:
    """--data, --data-dir, --download, --input-size and the training split's augmentation, shared by train and pretrain."""
    options = [
        click.option("--data", default=defaults.data, show_default=True, help=f"One of: {DATASETS.choices()}."),
        click.option("--data-dir", default=defaults.data_dir, help="Where torchvision data sets live."),
        click.option("--download", is_flag=True, default=defaults.download,
                     help="Allow torchvision to download the data set into --data-dir."),
        click.option("--input-size", type=int, default=defaults.input_size,
                     help="Resize inputs to SIZE x SIZE (default: the data set's)."),
        click.option("--augment", type=click.Choice(AUGMENTS.names()), default=defaults.augment,
                     help="Training-split augmentation (val/test never): none; basic = random crop (padded up to 64 px, "
                          "resized above) + horizontal flip where the data set allows it; trivial = basic + "
                          f"TrivialAugmentWide. Default: basic from {AUGMENT_FROM_EPOCHS} epochs on for up to "
                          f"{AUGMENT_MEASURED_IMAGES:,} training images, later for larger sets ({augment_from_epochs(42000)} "
                          "epochs at 42,000), none below (measured; model.pt records what ran)."),
        click.option("--flip/--no-flip", default=defaults.flip,
                     help="Horizontal flips in basic/trivial (default: the data set's: on for fashionmnist, cifar, "
                          "folder:; off for npz:; refused for digits, mnist, svhn)."),
        click.option("--label-smoothing", type=float, default=defaults.label_smoothing, show_default=True,
                     help="Label smoothing of every classifier's cross-entropy."),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS.names()), default=defaults.optimizer,
                     show_default=defaults.optimizer is not None,
                     help="adamw, or sgd (momentum 0.9, Nesterov, the papers' setting); weight decay --weight-decay."
                          + (f" Default: sgd from {SGD_FROM_IMAGES:,} training images on, adamw below (measured; "
                             "model.pt records what ran)." if defaults.optimizer is None else "")),
        click.option("--lr", type=float, default=defaults.lr,
                     help=f"Learning rate (default: the optimizer's: {', '.join(f'{n} {o.lr:g}' for n, o in OPTIMIZERS.items())})."),
        click.option("--weight-decay", type=float, default=defaults.weight_decay, show_default=True),
        click.option("--epochs", type=int, default=defaults.epochs, show_default=True),
        click.option("--batch-size", type=int, default=defaults.batch_size, show_default=True, help=BATCH_HELP),
        click.option("--seed", type=int, default=defaults.seed, show_default=True),
    ]
    def apply(command: Any) -> Any:
        for option in reversed(options):
            command = option(command)
        return command
    return apply



@click.command()
@data_options(D)
@click.option("--backbone", default=D.backbone, show_default=True, help="Backbone name: resnet20, resnet56, eenet8, torchvision:resnet18, ...")
@click.option("--backbone-args", default="{}", callback=lambda ctx, param, value: parse_json_object(value, "--backbone-args"),
              help='Keyword arguments of the backbone constructor as a JSON object, e.g. \'{"width": 4}\' (model.pt records them).')
@click.option("--method", default=D.method, show_default=True, help="Training method: eenet, ...")
@click.option("--exit-type", default=D.exit_type, help="Exit head type (default: the method's).")
@click.option("--num-exits", type=int, default=D.num_exits,
              help="Number of early exits (default: the method's: 3 for exclusion, else 2).")
@click.option("--placement", default=D.placement,
              help="Exit placement scheme (default: the method's: linear for exclusion, else pareto).")
@click.option("--placement-cost", type=click.Choice(PLACEMENT_COSTS), default=D.placement_cost, show_default=True,
              help="What placement targets: cumulative MACs, or prefix latency measured on this machine (onnxruntime CPU, 1 thread, batch 1).")
@click.option("--exit-at", default=D.exit_at, help="Explicit cut points, comma separated (overrides --placement).")
@click.option("--loss", default=D.loss, help="Loss (default: the method's), e.g. v1, v2 or v4 (EENets' exit tags).")
@click.option("--lambda", "lam", type=float, default=D.lam, show_default=True, help="Weight of the cost term.")
@click.option("--distill", default=D.distill, metavar="T,ALPHA|off",
              help="Self-distillation: every exit also learns the final classifier's output softened at temperature T "
                   "(KL, weight ALPHA). Default: the method's (off for every method; digits figures in benchmarks/README.md).")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=D.schedule, show_default=True,
              help="joint: everything trained together; mixed (EENets): the backbone and final classifier alone for the "
                   "first half of the epochs, then everything jointly.")
@click.option("--head-lr", type=float, default=D.head_lr,
              help="Learning rate of the exit heads (default: the method's share of --lr; eenet a third: 1e-3 under adamw, "
                   "0.017 under sgd; others: --lr).")
@click.option("--warmup-epochs", type=int, default=D.warmup_epochs, show_default=True,
              help="Epochs of the method's warm-up loss (EENets: v0, classifiers only) before the main loss.")
@click.option("--threshold", type=float, default=D.threshold, help="Default exit threshold written into the model.")
@click.option("--out", default="model.pt", show_default=True, type=click.Path(dir_okay=False), help="Output model.pt.")
@click.option("--weights", default=D.weights, type=click.Path(dir_okay=False),
              help="Pre-trained backbone weights (a state_dict file, or a checkpoint with 'state_dict'/'model'); never downloaded.")
@click.option("--branch-channels", type=int, default=D.branch_channels, help="Branch exits: conv channels (default: the cut's).")
@click.option("--branch-depth", type=int, default=D.branch_depth, help="Branch exits: conv-BN-ReLU blocks (default 2).")
@click.option("--beta", default=None, help=BETA_HELP)
@hardware_options
@click.option("--checkpoint-dir", default=D.checkpoint_dir, type=click.Path(file_okay=False),
              help="Write DIR/checkpoint.pt (atomically) after every epoch: weights, optimizer, scheduler, RNG states.")
@click.option("--resume", is_flag=True, default=D.resume,
              help="Continue from --checkpoint-dir's checkpoint (same settings required); starts fresh when there is none yet.")
def train(**opts: Any) -> None:
    """Train an exit-augmented model and write model.pt.

    \b
    Example: edgeexit train --data digits --backbone resnet20 --num-exits 2 --epochs 10 --out model.pt
    PTEENet (branches on a frozen pre-trained backbone, see `edgeexit pretrain`):
      edgeexit train --method pteenet --backbone torchvision:resnet18 --weights backbone.pt --data digits
    Several GPUs or machines (DistributedDataParallel; only rank 0 writes model.pt):
      torchrun --nproc_per_node 4 -m edgeexit train --device cuda --batch-size 64 ...
    """
    with training_extra():
        from edgeexit import workflows
    out = opts.pop("out")
    result = workflows.train(TrainSpec(**{**opts, "beta": parse_numbers(opts["beta"], "--beta")}), out, progress=True)
    if result.rank == 0:
        click.echo(f"wrote {out}: cuts {', '.join(result.cuts)}; kept epoch {result.best_epoch + 1} (lowest val loss): "
                   f"val accuracy {result.val_accuracy:.4f}, early-exit rate {result.val_exit_rate:.2f}")



@click.command()
@click.option("--backbone", required=True, help="Backbone name, e.g. resnet20 or torchvision:resnet18.")
@data_options(PRETRAIN)
@click.option("--out", default="backbone.pt", show_default=True, type=click.Path(dir_okay=False),
              help="Output model.pt (a static network: `export` takes it, `train --weights` reads its backbone).")
@hardware_options
def pretrain(**opts: Any) -> None:
    """Train a plain backbone (no exits) and write it as a model.pt: `export` makes it a one-stage bundle or a
    stage of a model cascade (export SMALL.pt BIG.pt OUT/), and `train --weights` reads its backbone.

    Example: edgeexit pretrain --backbone torchvision:resnet18 --data digits --input-size 32 --out backbone.pt
    """
    with training_extra():
        from edgeexit.train.pretrained import pretrain_backbone
    out = opts.pop("out")
    summary = pretrain_backbone(TrainSpec(**opts), out, progress=True)
    if summary["rank"] == 0:
        spec = summary["spec"]
        click.echo(f"wrote {out}: val accuracy {summary['val_accuracy']:.4f}, test accuracy {summary['test_accuracy']:.4f} "
                   f"({spec.epochs} epochs, {spec.optimizer} lr {spec.learning_rate:g}, augment {spec.augment}"
                   f"{' + flip' if spec.flip and spec.augment != 'none' else ''}, label smoothing {spec.label_smoothing:g})")



@click.command("export")
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path())
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True, help="ONNX opset.")
@click.option("--no-verify", is_flag=True, help="Skip the PyTorch parity checks (not recommended).")
@click.option("--static-batch", type=int, default=None,
              help="Fix every graph's batch dim to N (NNAPI/CoreML need fixed shapes); same as `edgeexit static-batch`.")
def export_cmd(models: tuple[str, ...], out: str, opset: int, no_verify: bool, static_batch: int | None) -> None:
    """Export model.pt to a bundle of per-stage ONNX graphs plus manifest.json; several model.pt files (smallest first)
    make one model cascade whose stages are the whole models, each reading the input.

    Example: edgeexit export model.pt bundle/   (for a phone NPU: --static-batch 1)
             edgeexit export small.pt big.pt bundle/   (a model cascade)
    """
    model = models[0] if len(models) == 1 else list(models)
    with training_extra():
        from edgeexit.export import export_bundle
        from edgeexit.export.static_batch import static_batch_bundle
    if static_batch is None:
        result = export_bundle(model, out, opset=opset, verify=not no_verify, progress=echo_err)
    else:
        Path(out).resolve().parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{Path(out).name}.symbolic-", dir=Path(out).resolve().parent) as tmp:
            result = export_bundle(model, Path(tmp) / "bundle", opset=opset, verify=not no_verify, progress=echo_err)
            static_batch_bundle(Path(tmp) / "bundle", out, static_batch, echo_err)
    worst = result.worst_diff
    graphs = "".join(f" + {graph.file}" for graph in result.manifest.cascades)
    checked = "not verified" if worst is None else f"verified, max diff {worst:.1e}" + (
        "; cascade.onnx decides as the chain" if result.manifest.cascades else "")
    click.echo(f"wrote {out}: {len(result.manifest.stages)} stages + full.onnx{graphs} ({checked})")



@click.command()
@click.option("--backbone", default="resnet20", show_default=True, help="Backbone name.")
@click.option("--input-size", type=int, default=32, show_default=True)
@click.option("--channels", type=int, default=None, help="Input channels (default: 1 for CIFAR-style nets, 3 otherwise).")
@click.option("--num-exits", type=int, default=2, show_default=True, help="Exits each scheme places.")
@click.option("--profile", is_flag=True, help="Export each cut's prefix graph and time it on onnxruntime; schemes place by latency.")
@click.option("--threads", type=int, default=1, show_default=True, help="--profile: onnxruntime intra-op threads.")
@click.option("--batch-size", type=int, default=1, show_default=True, help="--profile: inputs per timed call.")
@click.option("--repeats", type=int, default=50, show_default=True, help="--profile: timed calls per cut.")
def cuts(backbone: str, input_size: int, channels: int | None, num_exits: int, profile: bool, threads: int,
         batch_size: int, repeats: int) -> None:
    """List a backbone's candidate cut points with cumulative MACs (and measured latency) and the schemes that pick them.

    \b
    Example: edgeexit cuts --backbone resnet20
    Timed:   edgeexit cuts --backbone resnet20 --profile --threads 1 --batch-size 1
    """
    from edgeexit.runtime.calibrate import stderr_progress

    with training_extra():
        from edgeexit import workflows
    for line in workflows.describe_cuts(backbone, input_size, channels, num_exits, profile, threads, batch_size, repeats,
                                        stderr_progress):
        click.echo(line)


@click.command()
@click.option("--out", default="edgeexit-demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--epochs", type=int, default=8, show_default=True)
def demo(out: str, epochs: int) -> None:
    """Train on digits, export, run the cascade and full.onnx, and print a comparison table.

    Example: edgeexit demo --out demo/
    """
    with training_extra():
        from edgeexit import workflows
    rows = workflows.demo(out, epochs=epochs)
    click.echo(f"{'model':<18}{'accuracy':>10}{'rel. MACs':>11}{'exits':>16}{'p50 ms':>9}{'p95 ms':>9}")
    for name, row in rows.items():
        exits = "-" if row.get("exit_counts") is None else "/".join(map(str, row["exit_counts"]))
        click.echo(
            f"{name:<18}{row['accuracy']:>10.4f}{row['relative_macs']:>11.3f}{exits:>16}"
            f"{row['latency_ms']['p50']:>9.3f}{row['latency_ms']['p95']:>9.3f}"
        )
    calibrated = rows["calibrated (val)"]
    click.echo(f"calibrated: thresholds {','.join(f'{t:.3g}' for t in calibrated['thresholds'])} chosen on the val split for "
               f"at most {calibrated['target_drop']:g} points below the final classifier, written into {out}/bundle")
    click.echo(f"wrote {out}/model.pt, {out}/bundle/, {out}/report.json")



def echo_err(message: str) -> None:
    """Progress lines on stderr."""
    click.echo(message, err=True)


@click.command("static-batch")
@click.argument("bundle", type=click.Path())
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--batch", type=int, default=1, show_default=True, help="The fixed batch size.")
def static_batch_cmd(bundle: str, out: str, batch: int) -> None:
    """Write a copy of a bundle whose graphs have a fixed batch dim (for NNAPI / CoreML), checked against the original.

    The runtime feeds such a bundle N inputs at a time (the last group zero-padded). Needs the
    onnx package (the [train] extra), not torch.

    Example: edgeexit static-batch bundle/ bundle-b1/ --batch 1 && edgeexit run bundle-b1/ --device nnapi
    """
    with training_extra():
        from edgeexit.export.static_batch import static_batch_bundle
    manifest = static_batch_bundle(bundle, out, batch, echo_err)
    click.echo(f"wrote {out}: {len(manifest.stages)} stages + full.onnx with batch fixed to {batch}")


@click.command()
@click.argument("bundle", type=click.Path())
@click.argument("out", type=click.Path(file_okay=False))
@labeled_data_options
@click.option("--split", default="val", show_default=True, help="Split whose inputs calibrate activation ranges and thresholds.")
@click.option("--target-drop", type=float, default=None, help="Thresholds: lowest MACs within this accuracy drop (points).")
@click.option("--budget", type=float, default=None,
              help="Thresholds: best accuracy within this MACs fraction (default: what the fp32 bundle spends on the data).")
def quantize(bundle: str, out: str, data: str, data_dir: str | None, split: str, target_drop: float | None,
             budget: float | None) -> None:
    """Write an int8 copy of a bundle (static QDQ quantization, per-channel weights) with re-calibrated thresholds.

    Stage k is calibrated on the features stage k-1 of the fp32 bundle gives for the data.
    Needs the onnx package (the [train] extra), not torch.

    Example: edgeexit quantize bundle/ bundle-int8/ --data digits --split val
    """
    from edgeexit.runtime.calibrate import describe, stderr_progress
    from edgeexit.runtime.calibration import parse_objective
    from edgeexit.runtime.manifest import load_manifest

    objective = parse_objective(target_drop, budget, required=False, allowed=("target_drop", "budget"))
    with training_extra():
        from edgeexit.export.quantize import quantize_bundle
    x, labels = load_run_data(load_manifest(bundle).input_spec, data, None, split, data_dir)
    manifest = quantize_bundle(bundle, out, x, labels, objective, {"name": data, "split": split}, stderr_progress)
    point = "" if manifest.calibration is None else f"; operating point on {data}/{split}: {describe(manifest.calibration['chosen'])}"
    click.echo(f"wrote {out}: int8 ({len(manifest.stages)} stages + full.onnx){point}")


COMMANDS = [train, pretrain, export_cmd, static_batch_cmd, quantize, cuts, demo]
