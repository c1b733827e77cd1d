"""Runtime commands (torch-free; a torchvision --data set or --model baseline needs the [train] extra):
run, info, verify, calibrate, bench, profile."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from edgeexit.cli.common import (
    BETA_HELP, DATA_DIR_OPTION, DEVICE_HELP, beta_args, labeled_data_options, parse_numbers, training_extra,
)
from edgeexit.errors import ConfigError, MissingExtraError, VerificationError
from edgeexit.runtime.corruptions import CORRUPTIONS, DEFAULT_SEVERITY, MAX_SEVERITY
from edgeexit.runtime.datasets import DATASETS, DEFAULT_DATA
from edgeexit.runtime.drift import DEFAULT_WINDOW, GUARD_MODES
from edgeexit.runtime.latency import DEFAULT_PERCENTILE, PERCENTILES
from edgeexit.runtime.bench import BASELINE_PREFIX, BENCH_ENGINES
from edgeexit.runtime.profiles import ENGINES
from edgeexit.runtime.files import write_json_atomic
from edgeexit.runtime.policies import ensemble_choices, ensemble_policies


def _load_run_data(spec: Any, data: str | None, input_path: str | None, split: str,
                   data_dir: str | None = None) -> tuple[Any, Any]:
    """Model-ready inputs and labels for a bundle's InputSpec: --input (no labels), digits / npz:PATH / folder:PATH (torch-free), or a torchvision set."""
    from edgeexit.runtime.datasets import load_eval_data, load_input

    if input_path is not None:
        x, _ = load_input(input_path, spec)
        return x, None
    name = data or DEFAULT_DATA
    if DATASETS.resolve(name)[0].needs_torch:
        with training_extra():
            import edgeexit.train.data  # noqa: F401  (attaches the torchvision sets' loaders to DATASETS)
    return load_eval_data(name, split, spec, data_dir)



@click.command()
@click.argument("bundle", type=click.Path())
@click.option("--device", default="cpu", show_default=True, help=DEVICE_HELP)
@click.option("--data", default=None, help=f"Labeled data (default {DEFAULT_DATA}): {DATASETS.choices()}.")
@DATA_DIR_OPTION
@click.option("--input", "input_path", default=None, help="An image, a folder of images or a .npy array.")
@click.option("--split", default="test", show_default=True, help="Data split to evaluate: train, val, test or all.")
@click.option("--threshold", default=None, help="Override thresholds: T or T1,T2,...")
@click.option("--beta", default=None, help=BETA_HELP)
@click.option("--policy", default=None,
              help="Run every exit with this policy (confidence, max_softmax, entropy, ...) instead of the manifest's.")
@click.option("--ensemble", type=click.Choice(ensemble_choices()), default=None,
              help=f"Ensemble at deferral instead of the manifest's: each stage decides and predicts from the weighted "
                   f"mean of the class probabilities of every exit so far ({', '.join(ensemble_policies())} policies; "
                   f"weights: the calibrated ones when it is the manifest's own, else 1; none: each exit alone).")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores).")
@click.option("--engine", type=click.Choice(ENGINES), default="auto", show_default=True,
              help="graph: cascade.onnx (cascade_b1.onnx at batch size 1), one session run per batch; chain: one session "
                   "per stage; auto: graph when the bundle has cascade.onnx.")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Write the report here.")
@click.option("--guard", type=click.Choice(GUARD_MODES), default="off", show_default=True,
              help="Drift guard: compare exit shares per window with the calibration's; warn: one line per window out of "
                   "range; fallback: also raise the thresholds toward full.onnx while out of range.")
@click.option("--guard-window", type=int, default=DEFAULT_WINDOW, show_default=True, help="Inputs per drift-guard window.")
def run(bundle: str, device: str, data: str | None, data_dir: str | None, input_path: str | None, split: str, threshold: str | None,
        beta: str | None, policy: str | None, ensemble: str | None, batch_size: int, threads: int | None, engine: str,
        json_path: str | None, guard: str, guard_window: int) -> None:
    """Run a bundle as an early-exit cascade and report accuracy, MACs, exits and latency.

    Example: edgeexit run bundle/ --device cpu --data digits --json report.json
    """
    from edgeexit.runtime.graph import open_runner
    from edgeexit.runtime.drift import GuardSettings
    from edgeexit.runtime.report import run_report

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    runner = open_runner(bundle, engine, device=device, batch_size=batch_size, threads=threads,
                         thresholds=parse_numbers(threshold), policy_args=beta_args(beta), policy=policy, ensemble=ensemble)
    x, labels = _load_run_data(runner.manifest.input_spec, data, input_path, split, data_dir)
    report, result = run_report(runner, x, labels, batch_size, guard=GuardSettings(guard, guard_window))
    if labels is None:
        report["predictions"] = result.predictions.tolist()
        report["exit_index"] = result.exit_index.tolist()
        names = runner.manifest.input_spec.class_names
        for i, (p, e) in enumerate(zip(result.predictions, result.exit_index)):
            click.echo(f"{i}\t{names[p]}\texit {e}")
    if json_path:
        write_json_atomic(json_path, report)
    click.echo(format_report(report))


def format_report(report: dict) -> str:
    """One readable line of a run report."""
    acc = "n/a" if report.get("accuracy") is None else f"{report['accuracy']:.4f}"
    lat = report["latency_ms"]
    return (
        f"accuracy {acc}  relative MACs {report['relative_macs']:.3f}{format_expected(report)}  exits {report['exit_counts']}  "
        f"latency p50 {lat['p50']:.3f} ms p95 {lat['p95']:.3f} ms p99 {lat['p99']:.3f} ms (batch {report['batch_size']})"
    )


def format_expected(entry: dict) -> str:
    """The profile's predicted latency beside the measured one (mean ms per input), or nothing without a profile."""
    if entry.get("predicted_latency_ms") is None:
        return ""
    return (f"  expected {entry['predicted_latency_ms']:.3f} ms/input (measured {entry['measured_latency_ms']:.3f}, "
            f"profile {entry['expected_latency']['profile']})")



@click.command()
@click.argument("bundle", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the manifest (model.pt: its records) as JSON.")
def info(bundle: str, as_json: bool) -> None:
    """Describe a bundle: input, stages, MACs, exit policies; or a model.pt: the model and its training recipe.

    Example: edgeexit info bundle/   (or: edgeexit info model.pt, which needs the [train] extra)
    """
    from edgeexit.runtime.manifest import load_manifest

    if Path(bundle).is_file():
        with training_extra():
            from edgeexit.workflows import describe_model, model_record
        click.echo(json.dumps(model_record(bundle), indent=2) if as_json else "\n".join(describe_model(bundle)))
        return
    manifest = load_manifest(bundle)
    if as_json:
        click.echo(json.dumps(manifest.to_dict(), indent=2))
        return
    for line in describe_bundle(manifest, bundle):
        click.echo(line)


def describe_bundle(manifest: Any, name: str) -> list[str]:
    """Readable lines of a Manifest for `edgeexit info`: input, stages, MACs, exit policies, profiles, calibration."""
    spec = manifest.input_spec
    lines = [f"bundle {name}: {manifest.model.method} on {manifest.model.backbone}, {manifest.num_classes} classes",
             f"input {spec.name} {list(spec.shape)} {spec.dtype} {spec.layout}",
             f"full.onnx {manifest.full_macs / 1e6:.2f} MMACs"]
    if manifest.quantization is not None:
        lines.append(f"precision {manifest.precision}, quantized from '{manifest.quantization['parent']['name']}'")
    if manifest.static_batch is not None:
        lines.append(f"static batch {manifest.static_batch} (inputs run in groups of {manifest.static_batch})")
    for stage, cost in zip(manifest.stages, manifest.exit_costs()):
        line = f"  {stage.file}: segment {stage.macs.segment / 1e6:.2f} M + head {stage.macs.head / 1e6:.3f} M"
        line += f", leaving here costs {cost:.3f} of full"
        if stage.exit is not None:
            policy = stage.exit.policy
            line += f"; exit at {stage.exit.cut or '?'}: {policy.kind} threshold {policy.threshold}"
        lines.append(line)
    if manifest.cascade:
        vectors = ", ".join(f"{t.name} {list(t.default)}" for t in manifest.cascade.inputs[1:])
        lines.append(f"{manifest.cascade.file}: the whole cascade in one graph; per-exit vectors ({manifest.cascade.vectors}): {vectors}")
    if manifest.cascade_b1:
        lines.append(f"{manifest.cascade_b1.file}: the same at batch 1 without survivor compaction (`run` uses it for one input per call)")
    for key, profile in manifest.profiles.items():
        lines.append(f"profile {key}: full.onnx p50 {profile.full.p50:.3f} ms; leaving at each exit p50 "
                     + ", ".join(f"{t.p50:.3f}" for t in profile.exits) + " ms")
    if manifest.calibration:
        lines.append(f"calibrated: {json.dumps(manifest.calibration.get('chosen', {}))}")
    return lines


@click.command()
@click.argument("bundle", type=click.Path())
@click.option("--device", default="cpu", show_default=True, help=f"Device whose execution providers load the graphs. {DEVICE_HELP}")
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



@click.command()
@click.argument("bundle", type=click.Path())
@labeled_data_options
@click.option("--split", default="val", show_default=True, help="Data split to calibrate on: train, val, test or all (keep test for evaluation).")
@click.option("--target-drop", type=float, default=None, help="Lowest MACs within this accuracy drop (percentage points vs the final classifier).")
@click.option("--budget", type=float, default=None, help="Best accuracy within this fraction of the full model's MACs.")
@click.option("--latency-budget", type=float, default=None,
              help="Best accuracy whose predicted latency (ms, see --percentile) is within this budget.")
@click.option("--percentile", type=click.Choice(PERCENTILES), default=DEFAULT_PERCENTILE, show_default=True,
              help="What the budget bounds: mean (ms per input) or the 95th/99th percentile of ms per call.")
@click.option("--profile", "profile_name", default=None,
              help="Device profile (see `edgeexit info`; default: this host's one profile of the engine `run` picks).")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads.")
@click.option("--beta", default=None, help=BETA_HELP + " Fixes beta instead of searching it.")
@click.option("--policy", default=None,
              help="Exit policy: auto (the best of confidence, max_softmax, entropy the bundle can run) or a name "
                   "(default: the bundle's own).")
@click.option("--ensemble", type=click.Choice(ensemble_choices()), default=None,
              help="Ensemble at deferral (weighted arithmetic or geometric mean of the class probabilities of every exit "
                   "so far, weights fitted by NLL on the data): none or one (default: with --policy auto each is tried, "
                   "else the bundle's own).")
@click.option("--robust", is_flag=True,
              help="Meet the target on the data and on it under each corruption of --families (drop against full.onnx on "
                   "the same corrupted inputs); the record reports drop and MACs per family.")
@click.option("--families", default=None, help=f"Corruption families for --robust, comma-separated (default: all): {CORRUPTIONS.choices()}.")
@click.option("--severity", type=click.IntRange(1, MAX_SEVERITY), default=DEFAULT_SEVERITY, show_default=True,
              help="Corruption severity for --robust.")
@click.option("--shift-slack", type=float, default=None, metavar="POINTS",
              help="With --robust: extra drop in accuracy points allowed on each corrupted set beyond the target "
                   "(default 0: the target holds on every set); trades robustness for clean MACs.")
@click.option("--confidence-level", type=float, default=None, metavar="LEVEL",
              help="With --target-drop: the drop must hold with this one-sided confidence (e.g. 0.9), a margin of the "
                   "paired drop's standard errors on the data, so that it holds on new inputs too (default: none).")
def calibrate(bundle: str, data: str, data_dir: str | None, split: str, target_drop: float | None, budget: float | None,
              latency_budget: float | None, percentile: str, profile_name: str | None, threads: int | None,
              beta: str | None, policy: str | None, ensemble: str | None, robust: bool, families: str | None,
              severity: int, shift_slack: float | None, confidence_level: float | None) -> None:
    """Choose the exit policy, per-exit thresholds and temperatures for an accuracy-drop, MACs-budget or latency-budget
    target and write them into the manifest.

    Class-exclusion bundles: without --beta, beta_k is searched per exit as the method's
    authors do (greedy, cheapest exit first, the target drop as the accuracy tolerance).

    \b
    Example: edgeexit calibrate bundle/ --data digits --split val --target-drop 1.0 --policy auto
    Latency: edgeexit profile bundle/ --threads 1 --batch-size 1, then
      edgeexit calibrate bundle/ --latency-budget 0.5 --percentile 95
    """
    from edgeexit.runtime.calibrate import check_confidence, describe, stderr_progress
    from edgeexit.runtime.calibration import CalibrationOptions, calibrate_bundle, parse_objective
    from edgeexit.runtime.corruptions import parse_families
    from edgeexit.runtime.manifest import load_manifest
    from edgeexit.runtime.robust import RobustSettings

    if families is not None and not robust:
        raise ConfigError("--families chooses the corruptions of --robust: add --robust")
    if shift_slack is not None and not robust:
        raise ConfigError("--shift-slack loosens the target of --robust's corrupted sets: add --robust")
    objective = parse_objective(target_drop, budget, latency_budget)
    check_confidence(confidence_level, objective)
    options = CalibrationOptions(
        objective=objective, data={"name": data, "split": split}, confidence=confidence_level,
        profile=profile_name, percentile=percentile, threads=threads, beta=beta_args(beta), policy=policy, ensemble=ensemble,
        robust=RobustSettings(tuple(parse_families(families)), severity, slack_points=shift_slack or 0.0) if robust else None)
    x, labels = _load_run_data(load_manifest(bundle, check_hashes=False).input_spec, data, None, split, data_dir)
    result = calibrate_bundle(bundle, x, labels, options, stderr_progress)
    status = "met" if result.met else "NOT met (closest point chosen)"
    click.echo(f"reference accuracy {result.reference_accuracy:.4f} on {data}/{split}; target {status}")
    mixed = result.record.get("ensemble", {})
    weights = f" with {mixed['mode']} ensemble, weights {', '.join(f'{w:.3g}' for w in mixed['weights'])}" if "weights" in mixed else ""
    click.echo(f"policy {result.policy}{weights}, temperatures {', '.join(f'{t:.3g}' for t in result.temperatures)}")
    click.echo(f"operating point: {describe(result.chosen)}")
    if "confidence_level" in result.objective:
        drop = 100 * (result.reference_accuracy - result.chosen["accuracy"])
        click.echo(f"drop {drop:.2f} points, standard error {100 * result.chosen['drop_se']:.2f} (paired): the target holds "
                   f"at confidence {result.objective['confidence_level']:g} {'with' if result.met else 'WITHOUT'} the margin")
    for name, entry in result.record.get("robust", {}).get("sets", {}).items():
        click.echo(f"  {name:<12} full.onnx {entry['reference_accuracy']:.4f}  cascade {entry['accuracy']:.4f}  "
                   f"drop {entry['drop_points']:.2f} points  relative MACs {entry['relative_macs']:.3f}")
    click.echo(f"wrote policy, thresholds, temperatures and calibration curve into {bundle}/manifest.json")
    if result.needs_rebuild:
        click.echo(_rebuild_graph(bundle, x))


def _rebuild_graph(bundle: str, x: Any) -> str:
    """cascade.onnx after a calibration changed what it compiles in (policy, temperatures): rebuilt when onnx is installed."""
    try:
        from edgeexit.export.cascade_graph import rebuild_cascade
    except ImportError:
        return ("removed cascade.onnx (it compiles in the old policy): the stage chain runs meanwhile; install the onnx "
                "package and calibrate again to rebuild it")
    rebuild_cascade(bundle, x)
    return "rebuilt cascade.onnx for the new policy and temperatures (its decisions match the stage chain's)"


@click.command()
@click.argument("bundle", type=click.Path())
@labeled_data_options
@click.option("--split", default="test", show_default=True, help="Data split to benchmark on: train, val, test or all.")
@click.option("--device", default="cpu", show_default=True, help=DEVICE_HELP)
@click.option("--threads", type=int, default=None, help="onnxruntime (and PyTorch) intra-op threads.")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--model", "model_path", default=None, type=click.Path(dir_okay=False),
              help="model.pt the bundle was exported from: adds a PyTorch eager baseline (needs torch).")
@click.option("--eager-device", default="cpu", show_default=True,
              help="torch device of the --model eager baseline: auto, cpu, cuda, cuda:N or mps.")
@click.option("--baseline", "baseline_paths", multiple=True, type=click.Path(dir_okay=False),
              help="Your own static model (ONNX, taking the bundle's input), timed and scored beside the cascade; repeatable.")
@click.option("--limit", type=int, default=None, help="Use only the first N inputs.")
@click.option("--sweep-points", type=int, default=6, show_default=True, help="Thresholds timed in the sweep.")
@click.option("--engine", type=click.Choice(BENCH_ENGINES), default="auto", show_default=True,
              help="Cascade engine to time: auto (the one `run` picks), graph, chain, or both (run's first).")
@click.option("--out", default="bench", show_default=True, type=click.Path(file_okay=False), help="Folder for bench.json and PNGs.")
def bench(bundle: str, data: str, data_dir: str | None, split: str, device: str, threads: int | None, batch_size: int,
          model_path: str | None, eager_device: str, baseline_paths: tuple[str, ...], limit: int | None, sweep_points: int,
          engine: str, out: str) -> None:
    """Measure full.onnx vs the cascade (and your own static models, PyTorch eager) on the same inputs; write bench.json and plots.

    The cascade runs on the engine `run` would use (--engine both: that one and the other, interleaved).

    Example: edgeexit bench bundle/ --data digits --threads 1 --batch-size 1 --baseline small.onnx --out bench/
    """
    from edgeexit.runtime.bench import baseline_names, bench_runners, onnx_baseline, run_bench
    from edgeexit.runtime.bench_plots import write_plots
    from edgeexit.runtime.calibrate import stderr_progress

    if sweep_points < 2:
        raise ConfigError(f"--sweep-points must be >= 2, got {sweep_points}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    runner, *others = bench_runners(bundle, engine, batch_size, device=device, threads=threads)
    x, labels = _load_run_data(runner.manifest.input_spec, data, None, split, data_dir)
    if limit is not None:
        x, labels = x[:limit], labels[:limit]
    baselines = {name: onnx_baseline(path, runner) for name, path in zip(baseline_names(baseline_paths), baseline_paths)}
    if model_path is not None:
        with training_extra():
            from edgeexit.train.eager import eager_predictor
        baselines["pytorch_eager"] = eager_predictor(model_path, threads, eager_device)
    report = run_bench(runner, x, labels, batch_size, baselines, sweep_points, progress=stderr_progress, others=others)
    write_json_atomic(Path(out) / "bench.json", report)
    click.echo(format_bench(report))
    try:
        plots = ", ".join(p.name for p in write_plots(report, out))
    except MissingExtraError as exc:  # a runtime-only device still gets its numbers
        click.echo(f"warning: no plots: {exc}", err=True)
        plots = "no plots"
    click.echo(f"wrote {Path(out) / 'bench.json'} ({plots})")


@click.command()
@click.argument("bundle", type=click.Path())
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, tensorrt, ...")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores, stored as t0).")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Inputs per call.")
@click.option("--repeats", type=int, default=100, show_default=True, help="Timed calls per stage and exit (after warm-up).")
@click.option("--engine", type=click.Choice(ENGINES), default="auto", show_default=True,
              help="Engine to profile: graph (cascade.onnx; cascade_b1.onnx at batch size 1), chain (one session per "
                   "stage), auto: the one `run` picks.")
def profile(bundle: str, device: str, threads: int | None, batch_size: int, repeats: int, engine: str) -> None:
    """Measure each stage's and exit's latency and full.onnx on this machine; store a device profile in the manifest.

    Profiles are keyed HOST/DEVICE/tTHREADS/bBATCH/ENGINE; several live side by side (one bundle,
    profiled on a workstation and again on the board). run, bench and calibrate then report the
    latency a profile predicts; `calibrate --latency-budget MS` targets this host's profile of the
    engine `run` picks (or --profile NAME). The graph engine at batch 1 is cascade_b1.onnx when the
    bundle has it, as in `run`.

    Example: edgeexit profile bundle/ --device cpu --threads 1 --batch-size 1
    """
    from edgeexit.runtime.calibrate import stderr_progress
    from edgeexit.runtime.graph import open_runner
    from edgeexit.runtime.latency import describe_profile
    from edgeexit.runtime.profile import measure_profile
    from edgeexit.runtime.bundle import save_profile

    runner = open_runner(bundle, engine, device=device, batch_size=batch_size, threads=threads)
    measured = measure_profile(runner, batch_size, repeats, stderr_progress)
    save_profile(bundle, measured)
    for line in describe_profile(measured):
        click.echo(line)
    click.echo(f"wrote profile {measured.key} into {bundle}/manifest.json")


def format_bench(report: dict) -> str:
    """A small table of a bench report."""
    rows = ["full_onnx", *(name for name in report if name.startswith(("cascade", BASELINE_PREFIX))),
            *(["pytorch_eager"] if "pytorch_eager" in report else [])]
    lines = [f"cascade engine: {report['engine']}",
             f"{'variant':<23}{'accuracy':>9}{'rel. MACs':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'inputs/s':>10}"]
    for name in rows:
        row, lat = report[name], report[name]["latency_ms"]
        acc = "n/a" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        macs = "n/a" if row["relative_macs"] is None else f"{row['relative_macs']:.3f}"
        lines.append(f"{name:<23}{acc:>9}{macs:>10}{lat['p50']:>9.3f}{lat['p95']:>9.3f}"
                     f"{lat['p99']:>9.3f}{row['throughput_per_s']:>10.0f}")
    speed = report["speedup"]
    for name in (name for name in rows if name.startswith("cascade") and not name.endswith("no_exit")):
        if report[name]["predicted_latency_ms"] is not None:
            lines.append(f"{name} latency per input: predicted {report[name]['predicted_latency_ms']:.4f} ms, measured "
                         f"{report[name]['measured_latency_ms']:.4f} ms (profile {report[name]['expected_latency']['profile']})")
    no_exit = f"; no-exit/full {speed['no_exit_over_full']:.3f}" if "no_exit_over_full" in speed else ""
    lines.append(f"speedup realized {speed['realized']:.2f}x vs MACs-predicted {speed['macs_predicted']:.2f}x "
                 f"(ratio {speed['realized_over_predicted']:.2f}){no_exit}")
    if "oracle" in report:
        lines.append(f"oracle: accuracy {report['oracle']['accuracy']:.4f} at relative MACs {report['oracle']['relative_macs']:.3f}")
    return "\n".join(lines)


COMMANDS = [run, info, verify, calibrate, bench, profile]
