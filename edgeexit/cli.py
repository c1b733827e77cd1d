"""The `edgeexit` command line: train, export, run, info, verify, cuts, demo.

Runtime commands import only edgeexit.runtime; training-side commands import torch lazily
and say which extra to install when it is missing. Every error the project raises is
printed as one line with its own exit code, never as a traceback.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from edgeexit import __version__
from edgeexit.runtime.errors import ConfigError, EdgeExitError, MissingExtraError, VerificationError

DEBUG_ENV = "EDGEEXIT_DEBUG"


def train_side(module: str) -> Any:
    """Import a training-side module, or raise MissingExtraError naming the [train] extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        raise MissingExtraError(
            f"this command needs the training extra ({missing} is not installed): pip install \"edgeexit[train]\""
        ) from None


class Group(click.Group):
    """click group that turns project errors and unexpected failures into one-line messages."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgeExitError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # last line of defence: no traceback unless asked for
            if os.environ.get(DEBUG_ENV):
                raise
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            click.echo(f"error: unexpected {type(exc).__name__}: {message} (set {DEBUG_ENV}=1 for details)", err=True)
            sys.exit(1)


def parse_thresholds(value: str | None) -> float | list[float] | None:
    """'0.7' -> 0.7; '0.6,0.8' -> [0.6, 0.8]; None stays None."""
    if value is None:
        return None
    try:
        parts = [float(v) for v in value.split(",")]
    except ValueError:
        raise ConfigError(f"--threshold takes a number or comma-separated numbers, got '{value}'") from None
    return parts[0] if len(parts) == 1 else parts


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write a report atomically."""
    from edgeexit.runtime.manifest import write_json_atomic

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(target, data)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeexit")
def main() -> None:
    """edgeexit: early-exit CNNs for edge devices.

    \b
    Typical flow:
      edgeexit train --data digits --backbone resnet20 --out model.pt
      edgeexit export model.pt bundle/
      edgeexit run bundle/ --device cpu --data digits
    """


@main.command()
@click.option("--data", default="digits", show_default=True, help="digits, mnist, cifar10, cifar100, svhn or folder:PATH.")
@click.option("--data-dir", default=None, help="Where torchvision data sets live.")
@click.option("--download", is_flag=True, help="Allow torchvision to download the data set into --data-dir.")
@click.option("--input-size", type=int, default=None, help="Resize inputs to SIZE x SIZE (default: the data set's).")
@click.option("--backbone", default="resnet20", show_default=True, help="Backbone name: resnet20, resnet56, eenet8, torchvision:resnet18, ...")
@click.option("--method", default="eenet", show_default=True, help="Training method: eenet, ...")
@click.option("--exit-type", default=None, help="Exit head type (default: the method's).")
@click.option("--num-exits", type=int, default=2, show_default=True, help="Number of early exits.")
@click.option("--placement", default="pareto", show_default=True, help="Exit placement scheme.")
@click.option("--exit-at", default=None, help="Explicit cut points, comma separated (overrides --placement).")
@click.option("--loss", default=None, help="Loss (default: the method's), e.g. v1, v2 or v4 (EENets' exit tags).")
@click.option("--lambda", "lam", type=float, default=1.0, show_default=True, help="Weight of the cost term.")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--lr", type=float, default=3e-3, show_default=True, help="AdamW learning rate (cosine schedule).")
@click.option("--head-lr", type=float, default=None,
              help="Learning rate of the exit heads (default: the method's; eenet/pteenet 1e-3, gentler than the backbone's).")
@click.option("--warmup-epochs", type=int, default=1, show_default=True,
              help="Epochs of the method's warm-up loss (EENets: v0, classifiers only) before the main loss.")
@click.option("--threshold", type=float, default=None, help="Default exit threshold written into the model.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", default="model.pt", show_default=True, type=click.Path(dir_okay=False), help="Output model.pt.")
@click.option("--weights", default=None, type=click.Path(dir_okay=False),
              help="Pre-trained backbone weights (a state_dict file, or a checkpoint with 'state_dict'/'model'); never downloaded.")
@click.option("--branch-channels", type=int, default=None, help="Branch exits: conv channels (default: the cut's).")
@click.option("--branch-depth", type=int, default=None, help="Branch exits: conv-BN-ReLU blocks (default 2).")
def train(**opts: Any) -> None:
    """Train an exit-augmented model and write model.pt.

    \b
    Example: edgeexit train --data digits --backbone resnet20 --num-exits 2 --epochs 10 --out model.pt
    PTEENet (branches on a frozen pre-trained backbone, see `edgeexit pretrain`):
      edgeexit train --method pteenet --backbone torchvision:resnet18 --weights backbone.pt --data digits
    """
    api = train_side("edgeexit.api")
    summary = api.train(**opts, progress=True)
    click.echo(
        f"wrote {opts['out']}: cuts {', '.join(summary['cuts'])}; kept epoch {summary['best_epoch'] + 1} (lowest val loss): "
        f"val accuracy {summary['val_accuracy']:.4f}, early-exit rate {summary['val_exit_rate']:.2f}"
    )


@main.command()
@click.option("--backbone", required=True, help="Backbone name, e.g. resnet20 or torchvision:resnet18.")
@click.option("--data", default="digits", show_default=True, help="digits, mnist, cifar10, cifar100, svhn or folder:PATH.")
@click.option("--data-dir", default=None, help="Where torchvision data sets live.")
@click.option("--download", is_flag=True, help="Allow torchvision to download the data set into --data-dir.")
@click.option("--input-size", type=int, default=None, help="Resize inputs to SIZE x SIZE (default: the data set's).")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--lr", type=float, default=0.05, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", default="backbone.pt", show_default=True, type=click.Path(dir_okay=False), help="Output state_dict.")
def pretrain(**opts: Any) -> None:
    """Train a plain backbone (no exits) and write its state_dict, the input of `train --weights`.

    Example: edgeexit pretrain --backbone torchvision:resnet18 --data digits --input-size 32 --out backbone.pt
    """
    pretrained = train_side("edgeexit.pretrained")
    summary = pretrained.pretrain_backbone(**opts, progress=True)
    click.echo(f"wrote {opts['out']}: val accuracy {summary['val_accuracy']:.4f}, test accuracy {summary['test_accuracy']:.4f}")


@main.command("export")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset.")
@click.option("--no-verify", is_flag=True, help="Skip the PyTorch parity checks (not recommended).")
def export_cmd(model: str, out: str, opset: int, no_verify: bool) -> None:
    """Export model.pt to a bundle of per-stage ONNX graphs plus manifest.json.

    Example: edgeexit export model.pt bundle/
    """
    exporter = train_side("edgeexit.export")
    manifest = exporter.export_bundle(model, out, opset=opset, verify=not no_verify, progress=lambda m: click.echo(m, err=True))
    worst = None
    if manifest["verification"]:
        worst = max(v for kind in manifest["verification"].values() for v in kind.values())
    checked = "not verified" if worst is None else f"verified, max diff {worst:.1e}"
    click.echo(f"wrote {out}: {len(manifest['stages'])} stages + full.onnx ({checked})")


DATA_DIR_OPTION = click.option("--data-dir", default=None, help="Where torchvision data sets live (mnist, cifar10, ...).")


def labeled_data_options(command: Any) -> Any:
    """--data (default digits) and --data-dir, for the commands that need labels (calibrate, bench)."""
    data = click.option("--data", default="digits", show_default=True, help="Labeled data: digits, folder:PATH, or a torchvision set.")
    return data(DATA_DIR_OPTION(command))


def _load_run_data(runner: Any, data: str | None, input_path: str | None, split: str,
                   data_dir: str | None = None) -> tuple[Any, Any]:
    """Model-ready inputs and labels: --input (no labels), digits / folder:PATH (torch-free), or a torchvision set."""
    from edgeexit.runtime.datasets import load_eval_data, load_input

    spec = runner.manifest.input_spec
    if input_path is not None:
        x, _ = load_input(input_path, spec)
        return x, None
    name = data or "digits"
    if name == "digits" or name.startswith("folder:"):
        return load_eval_data(name, split, spec)
    return train_side("edgeexit.api").eval_arrays(name, split, spec, data_dir)


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, tensorrt, jetson, coreml, openvino, ...")
@click.option("--data", default=None, help="Labeled data: digits (default), folder:PATH, or a torchvision set.")
@DATA_DIR_OPTION
@click.option("--input", "input_path", default=None, help="An image, a folder of images or a .npy array.")
@click.option("--split", default="test", show_default=True, help="Data split to evaluate.")
@click.option("--threshold", default=None, help="Override thresholds: T or T1,T2,...")
@click.option("--beta", type=float, default=None, help="Class-exclusion bundles: override the dynamic-threshold beta in [0, 1].")
@click.option("--policy", default=None,
              help="Run every exit with this policy (confidence, max_softmax, entropy, ...) instead of the manifest's.")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores).")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Write the report here.")
def run(bundle: str, device: str, data: str | None, data_dir: str | None, input_path: str | None, split: str, threshold: str | None,
        beta: float | None, policy: str | None, batch_size: int, threads: int | None, json_path: str | None) -> None:
    """Run a bundle as an early-exit cascade and report accuracy, MACs, exits and latency.

    Example: edgeexit run bundle/ --device cpu --data digits --json report.json
    """
    from edgeexit.runtime.cascade import CascadeRunner
    from edgeexit.runtime.report import run_report

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    policy_args = None if beta is None else {"beta": beta}
    runner = CascadeRunner(bundle, device=device, threads=threads, thresholds=parse_thresholds(threshold),
                           policy_args=policy_args, policy=policy)
    x, labels = _load_run_data(runner, data, input_path, split, data_dir)
    report, result = run_report(runner, x, labels, batch_size)
    if labels is None:
        report["predictions"] = result.predictions.tolist()
        report["exit_index"] = result.exit_index.tolist()
        names = runner.manifest.input_spec["class_names"]
        for i, (p, e) in enumerate(zip(result.predictions, result.exit_index)):
            click.echo(f"{i}\t{names[p]}\texit {e}")
    if json_path:
        write_json(json_path, report)
    click.echo(format_report(report))


def format_report(report: dict) -> str:
    """One readable line of a run report."""
    acc = "n/a" if report.get("accuracy") is None else f"{report['accuracy']:.4f}"
    lat = report["latency_ms"]
    return (
        f"accuracy {acc}  relative MACs {report['relative_macs']:.3f}  exits {report['exit_counts']}  "
        f"latency p50 {lat['p50']:.3f} ms p95 {lat['p95']:.3f} ms p99 {lat['p99']:.3f} ms (batch {report['batch_size']})"
    )


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def info(bundle: str, as_json: bool) -> None:
    """Describe a bundle: input, stages, MACs, exit policies.

    Example: edgeexit info bundle/
    """
    from edgeexit.runtime.manifest import load_manifest

    manifest = load_manifest(bundle)
    if as_json:
        click.echo(json.dumps(manifest.data, indent=2))
        return
    data = manifest.data
    spec = data["input"]
    model = data.get("model", {})
    click.echo(f"bundle {bundle}: {model.get('method', '?')} on {model.get('backbone', '?')}, {data['num_classes']} classes")
    click.echo(f"input {spec['name']} {spec['shape']} {spec['dtype']} {spec['layout']}")
    click.echo(f"full.onnx {data['full']['macs'] / 1e6:.2f} MMACs")
    for stage, cost in zip(data["stages"], manifest.exit_costs()):
        line = f"  {stage['file']}: segment {stage['macs']['segment'] / 1e6:.2f} M + head {stage['macs']['head'] / 1e6:.3f} M"
        line += f", leaving here costs {cost:.3f} of full"
        if stage.get("exit"):
            policy = stage["exit"]["policy"]
            line += f"; exit at {stage['exit'].get('cut', '?')}: {policy['kind']} threshold {policy['threshold']}"
        click.echo(line)
    if data.get("calibration"):
        click.echo(f"calibrated: {json.dumps(data['calibration'].get('chosen', {}))}")


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--device", default="cpu", show_default=True, help="Device whose execution providers load the graphs.")
@click.option("--samples", type=int, default=8, show_default=True, help="Random inputs for the chain vs full.onnx check.")
def verify(bundle: str, device: str, samples: int) -> None:
    """Check a bundle: manifest schema, sha256 of every graph, ONNX checker, chained stages vs full.onnx.

    Prints one line per check (ok, FAIL, or skip: the ONNX checker is skipped when the onnx
    package is not installed). Exit code 0 only if no check failed.

    Example: edgeexit verify bundle/
    """
    from edgeexit.runtime.verify import verify_bundle

    checks = verify_bundle(bundle, device=device, samples=samples)
    for check in checks:
        click.echo(check.line())
    failed = [check for check in checks if check.failed]
    if failed:
        raise VerificationError(f"{len(failed)} of {len(checks)} checks failed for {bundle}")
    click.echo(f"bundle {bundle} verified")


@main.command()
@click.option("--backbone", default="resnet20", show_default=True, help="Backbone name.")
@click.option("--input-size", type=int, default=32, show_default=True)
@click.option("--channels", type=int, default=None, help="Input channels (default: 1 for CIFAR-style nets, 3 otherwise).")
@click.option("--num-exits", type=int, default=2, show_default=True, help="Exits each scheme places.")
def cuts(backbone: str, input_size: int, channels: int | None, num_exits: int) -> None:
    """List a backbone's candidate cut points with cumulative MACs and the schemes that pick them.

    Example: edgeexit cuts --backbone resnet20
    """
    api = train_side("edgeexit.api")
    for line in api.describe_cuts(backbone, input_size, channels, num_exits):
        click.echo(line)


@main.command()
@click.option("--out", default="edgeexit-demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--epochs", type=int, default=8, show_default=True)
def demo(out: str, epochs: int) -> None:
    """Train on digits, export, run the cascade and full.onnx, and print a comparison table.

    Example: edgeexit demo --out demo/
    """
    api = train_side("edgeexit.api")
    rows = api.demo(out, epochs=epochs)
    click.echo(f"{'model':<18}{'accuracy':>10}{'rel. MACs':>11}{'exits':>16}{'p50 ms':>9}{'p95 ms':>9}")
    for name, row in rows.items():
        exits = "-" if row.get("exit_counts") is None else "/".join(map(str, row["exit_counts"]))
        click.echo(
            f"{name:<18}{row['accuracy']:>10.4f}{row['relative_macs']:>11.3f}{exits:>16}"
            f"{row['latency_ms']['p50']:>9.3f}{row['latency_ms']['p95']:>9.3f}"
        )
    click.echo(f"wrote {out}/model.pt, {out}/bundle/, {out}/report.json")


@main.command()
@click.argument("bundle", type=click.Path())
@labeled_data_options
@click.option("--split", default="val", show_default=True, help="Data split to calibrate on (keep test for evaluation).")
@click.option("--target-drop", type=float, default=None, help="Lowest MACs within this accuracy drop (percentage points vs the final classifier).")
@click.option("--budget", type=float, default=None, help="Best accuracy within this fraction of the full model's MACs.")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads.")
@click.option("--policy", default=None,
              help="Exit policy: auto (the best of confidence, max_softmax, entropy the bundle can run) or a name "
                   "(default: the bundle's own).")
def calibrate(bundle: str, data: str, data_dir: str | None, split: str, target_drop: float | None, budget: float | None,
              threads: int | None, policy: str | None) -> None:
    """Choose the exit policy and per-exit thresholds for an accuracy-drop or MACs-budget target, fit per-exit
    temperatures, and write them into the manifest.

    Example: edgeexit calibrate bundle/ --data digits --split val --target-drop 1.0 --policy auto
    """
    from edgeexit.runtime.calibrate import apply_calibration, calibrate as run_calibration, describe, stderr_progress
    from edgeexit.runtime.cascade import CascadeRunner

    if (target_drop is None) == (budget is None):
        raise ConfigError("give exactly one of --target-drop POINTS or --budget FRACTION")
    objective = ("target_drop", target_drop) if target_drop is not None else ("budget", budget)
    runner = CascadeRunner(bundle, threads=threads)
    x, labels = _load_run_data(runner, data, None, split, data_dir)
    record = run_calibration(runner, x, labels, objective, {"name": data, "split": split}, stderr_progress, policy)
    apply_calibration(bundle, record)
    chosen = record["chosen"]
    status = "met" if chosen["met"] else "NOT met (closest point chosen)"
    click.echo(f"reference accuracy {record['reference_accuracy']:.4f} on {data}/{split}; target {status}")
    click.echo(f"policy {record['policy']}, temperatures {', '.join(f'{t:.3g}' for t in record['temperatures'])}")
    click.echo(f"operating point: {describe(chosen)}")
    click.echo(f"wrote policy, thresholds, temperatures and calibration curve into {bundle}/manifest.json")


@main.command()
@click.argument("bundle", type=click.Path())
@labeled_data_options
@click.option("--split", default="test", show_default=True, help="Data split to benchmark on.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, tensorrt, ...")
@click.option("--threads", type=int, default=None, help="onnxruntime (and PyTorch) intra-op threads.")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--model", "model_path", default=None, type=click.Path(dir_okay=False),
              help="model.pt the bundle was exported from: adds a PyTorch eager baseline (needs torch).")
@click.option("--limit", type=int, default=None, help="Use only the first N inputs.")
@click.option("--sweep-points", type=int, default=6, show_default=True, help="Thresholds timed in the sweep.")
@click.option("--out", default="bench", show_default=True, type=click.Path(file_okay=False), help="Folder for bench.json and PNGs.")
def bench(bundle: str, data: str, data_dir: str | None, split: str, device: str, threads: int | None, batch_size: int,
          model_path: str | None, limit: int | None, sweep_points: int, out: str) -> None:
    """Measure full.onnx vs the cascade (and PyTorch eager) on the same inputs; write bench.json and plots.

    Example: edgeexit bench bundle/ --data digits --threads 1 --batch-size 1 --model model.pt --out bench/
    """
    from edgeexit.runtime.bench import run_bench
    from edgeexit.runtime.bench_plots import write_plots
    from edgeexit.runtime.calibrate import stderr_progress
    from edgeexit.runtime.cascade import CascadeRunner

    if sweep_points < 2:
        raise ConfigError(f"--sweep-points must be >= 2, got {sweep_points}")
    runner = CascadeRunner(bundle, device=device, threads=threads)
    x, labels = _load_run_data(runner, data, None, split, data_dir)
    if limit is not None:
        x, labels = x[:limit], labels[:limit]
    baselines = {}
    if model_path is not None:
        baselines["pytorch_eager"] = train_side("edgeexit.eager").eager_predictor(model_path, threads)
    report = run_bench(runner, x, labels, batch_size, baselines, sweep_points, progress=stderr_progress)
    write_json(Path(out) / "bench.json", report)
    click.echo(format_bench(report))
    try:
        plots = ", ".join(p.name for p in write_plots(report, out))
    except MissingExtraError as exc:  # a runtime-only device still gets its numbers
        click.echo(f"warning: no plots: {exc}", err=True)
        plots = "no plots"
    click.echo(f"wrote {Path(out) / 'bench.json'} ({plots})")


def format_bench(report: dict) -> str:
    """A small table of a bench report."""
    rows = [name for name in ("full_onnx", "cascade", "cascade_no_exit", "pytorch_eager") if name in report]
    lines = [f"{'variant':<17}{'accuracy':>9}{'rel. MACs':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'inputs/s':>10}"]
    for name in rows:
        row, lat = report[name], report[name]["latency_ms"]
        acc = "n/a" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        lines.append(f"{name:<17}{acc:>9}{row['relative_macs']:>10.3f}{lat['p50']:>9.3f}{lat['p95']:>9.3f}"
                     f"{lat['p99']:>9.3f}{row['throughput_per_s']:>10.0f}")
    speed = report["speedup"]
    lines.append(f"speedup realized {speed['realized']:.2f}x vs MACs-predicted {speed['macs_predicted']:.2f}x "
                 f"(ratio {speed['realized_over_predicted']:.2f}); no-exit/full {speed['no_exit_over_full']:.3f}")
    if "oracle" in report:
        lines.append(f"oracle: accuracy {report['oracle']['accuracy']:.4f} at relative MACs {report['oracle']['relative_macs']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
