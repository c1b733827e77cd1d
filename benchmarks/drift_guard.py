"""The drift guard on a stream that shifts: does it see the shift, and what does fallback buy back?

From an exported bundle: calibrate a scratch copy on --data's val split (`--policy auto --target-drop`, plain
as most users do, or `--robust FAMILIES`; the calibration records the drift reference). Then, per corruption family, serve a stream in
batches of --batch-size: the test images clean, then the same images under that family (--repeats draws, each
its own seed), run three ways over the same stream: the cascade alone (guard off), the cascade behind
`--guard fallback` (DriftGuard, window --window), and full.onnx. Per phase (clean, shifted): accuracy, the
relative MACs actually spent (the guard's probes of the calibrated cascade included), and for the guard the
windows out of range and how many shifted inputs passed before the first flagged window.

    edgeexit demo --out demo/ && python benchmarks/drift_guard.py --bundle demo/bundle --window 64 --repeats 4
    python benchmarks/drift_guard.py --bundle DIR --data npz:../shared/data/fashion-mnist-60k.npz --limit 2000 --tag fashion

Results: benchmarks/results/drift_guard.json (one entry per --tag).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from edgeexit.runtime.bundle import save_calibration
from edgeexit.runtime.calibrate import calibrate
from edgeexit.runtime.cascade import CascadeResult, CascadeRunner
from edgeexit.runtime.corruptions import CORRUPTIONS, DEFAULT_SEVERITY, corrupt_model_ready, parse_families
from edgeexit.runtime.datasets import load_eval_data
from edgeexit.runtime.drift import DEFAULT_WINDOW, DriftGuard, GuardSettings
from edgeexit.runtime.robust import RobustSettings

RESULTS = Path(__file__).resolve().parent / "results"
TEST_SEED = 2000  # the stream's corruptions draw other parameters than any calibration's


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Spending:
    """The relative MACs a runner spends, tallied per call (predict and full.onnx), whoever calls it."""

    def __init__(self, runner: CascadeRunner) -> None:
        self.costs = np.asarray(runner.manifest.exit_costs())
        self.total = 0.0
        predict, full = runner.predict, runner.predict_full

        def counted_predict(x, *args, **kwargs) -> CascadeResult:
            result = predict(x, *args, **kwargs)
            self.total += float(self.costs[result.exit_index].sum())
            return result

        def counted_full(x):
            self.total += 1.0 * len(x)  # full.onnx: the unit of relative MACs (a model cascade's last stage costs more)
            return full(x)

        runner.predict, runner.predict_full = counted_predict, counted_full


def serve(runner: CascadeRunner, spending: Spending, phases: dict[str, np.ndarray], labels: dict[str, np.ndarray],
          batch: int, mode: str, window: int) -> dict:
    """One stream through the cascade (`mode`: off, fallback) or full.onnx (`mode`: full); figures per phase."""
    guard = DriftGuard(runner, GuardSettings(mode, window), say=lambda line: None) if mode in ("warn", "fallback") else None
    out = {}
    for phase, x in phases.items():
        spent, flagged_before = spending.total, guard.out_of_range if guard else 0
        first_flag, predictions = None, []
        for start in range(0, len(x), batch):
            chunk = x[start : start + batch]
            if mode == "full":
                predictions.append(runner.predict_full(chunk).argmax(axis=1))
                continue
            before = guard.out_of_range if guard else 0
            predictions.append((guard.predict(chunk) if guard else runner.predict(chunk)).predictions)
            if guard and first_flag is None and guard.out_of_range > before:
                first_flag = start + len(chunk)
        y = labels[phase]
        entry = {"accuracy": float((np.concatenate(predictions) == y).mean()),
                 "relative_macs": (spending.total - spent) / len(x)}
        if guard:
            entry.update({"windows_out_of_range": guard.out_of_range - flagged_before,
                          "inputs_before_first_flag": first_flag, "fallback_level_at_end": guard.level})
        out[phase] = entry
    if guard:
        guard.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--data", default="digits")
    parser.add_argument("--families", default=",".join(CORRUPTIONS), help="families the stream shifts to, one per stream")
    parser.add_argument("--severity", type=int, default=DEFAULT_SEVERITY)
    parser.add_argument("--target-drop", type=float, default=0.5)
    parser.add_argument("--policy", default="auto")
    parser.add_argument("--robust", default=None, metavar="FAMILIES",
                        help="calibrate with --robust on these corruption families instead of plainly")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="drift-guard window (inputs)")
    parser.add_argument("--batch-size", type=int, default=8, help="inputs per call of the stream")
    parser.add_argument("--repeats", type=int, default=1, help="draws of each corruption in the shifted phase")
    parser.add_argument("--limit", type=int, default=None, help="use the first N images of val and of test")
    parser.add_argument("--tag", default="digits", help="key of this run in the results file")
    parser.add_argument("--out", default=str(RESULTS / "drift_guard.json"))
    args = parser.parse_args()

    families = parse_families(args.families)
    with tempfile.TemporaryDirectory() as scratch:
        bundle = shutil.copytree(args.bundle, Path(scratch) / "bundle")
        spec = CascadeRunner(bundle).manifest.input_spec
        val = tuple(a[: args.limit] for a in load_eval_data(args.data, "val", spec))
        test_x, test_y = (a[: args.limit] for a in load_eval_data(args.data, "test", spec))
        robust = None if args.robust is None else RobustSettings(tuple(parse_families(args.robust)), args.severity)
        log(f"calibrating on val ({'robust on ' + args.robust if robust else 'plain'}, target drop {args.target_drop})")
        record = calibrate(CascadeRunner(bundle), *val, ("target_drop", args.target_drop), {"name": args.data, "split": "val"},
                           lambda message: None, policy=args.policy, robust=robust)
        save_calibration(bundle, record)
        runner = CascadeRunner(bundle)
        spending = Spending(runner)
        streams = {}
        for i, family in enumerate(families):
            shifted = np.concatenate([corrupt_model_ready(test_x, spec.mean, spec.std, family, args.severity,
                                                          TEST_SEED + 100 * i + r) for r in range(args.repeats)])
            phases = {"clean": test_x, "shifted": shifted}
            labels = {"clean": test_y, "shifted": np.tile(test_y, args.repeats)}
            streams[family] = {mode: serve(runner, spending, phases, labels, args.batch_size, mode, args.window)
                               for mode in ("off", "fallback", "full")}
            row = streams[family]
            log(f"{family:<12} shifted: full.onnx {row['full']['shifted']['accuracy']:.4f}  "
                f"cascade {row['off']['shifted']['accuracy']:.4f} at {row['off']['shifted']['relative_macs']:.3f}  "
                f"guarded {row['fallback']['shifted']['accuracy']:.4f} at {row['fallback']['shifted']['relative_macs']:.3f} "
                f"(first flag after {row['fallback']['shifted']['inputs_before_first_flag']} inputs); clean: guarded "
                f"{row['fallback']['clean']['accuracy']:.4f} at {row['fallback']['clean']['relative_macs']:.3f}, "
                f"{row['fallback']['clean']['windows_out_of_range']} false alarms")
    entry = {"bundle": Path(args.bundle).name, "data": args.data, "target_drop": args.target_drop, "policy": record["policy"],
             "ensemble": record.get("ensemble"), "thresholds": record["chosen"]["thresholds"], "severity": args.severity,
             "robust_families": None if robust is None else list(robust.families),
             "window": args.window, "batch_size": args.batch_size, "repeats": args.repeats, "test_samples": int(len(test_y)),
             "host": platform.machine(), "streams": streams}
    out = Path(args.out)
    existing = json.loads(out.read_text()) if out.is_file() else {}
    existing[args.tag] = entry
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(existing, indent=2) + "\n")
    log(f"wrote {out} [{args.tag}]")


if __name__ == "__main__":
    main()
