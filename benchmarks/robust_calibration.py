"""Plain vs robust calibration under corruptions: does a val-calibrated cascade hold on shifted inputs?

From an exported bundle: calibrate (--policy, --target-drop) on --data's val split twice, plain
and `--robust` over --families; then on the test split, clean and under every corruption family
(the calibration families and the held-out ones it never saw), report full.onnx's accuracy, the
cascade's, the drop in points and the relative MACs of each calibration. --leave-one-out adds, per
family, a robust calibration on all the other families measured on that one. The cascade is simulated
from the stage chain's stored outputs with the runtime's own policies (what `run` does). Writes
results/robust_calibration.json.

    edgeexit demo --out demo/ && python benchmarks/robust_calibration.py --bundle demo/bundle
    python benchmarks/robust_calibration.py --bundle DIR/bundle --data npz:../shared/data/fashion-mnist-60k.npz --tag fashion
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
from edgeexit.runtime.cascade import CascadeRunner
from edgeexit.runtime.corruptions import CORRUPTIONS, DEFAULT_SEVERITY, corrupt_model_ready, parse_families
from edgeexit.runtime.datasets import load_eval_data
from edgeexit.runtime.robust import CLEAN, RobustSettings
from edgeexit.runtime.simulate import CascadeSimulator

RESULTS = Path(__file__).resolve().parent / "results"
CALIBRATION_FAMILIES = "rotation,blur,noise,contrast"
TEST_SEED = 1000  # test corruptions draw other parameters than calibration's


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def calibrated_policies(bundle: str, record: dict) -> list:
    """The exit policies a bundle runs once `record` is written into it (a scratch copy; the bundle is left as it is)."""
    with tempfile.TemporaryDirectory() as scratch:
        copy = shutil.copytree(bundle, Path(scratch) / "bundle")
        save_calibration(copy, record)
        return CascadeRunner(copy).policies


def evaluate(record: dict, runner: CascadeRunner, test_sets: dict) -> dict:
    """Per test set: full.onnx accuracy, the cascade's as calibrated by `record`, drop, MACs."""
    policies = calibrated_policies(str(runner.manifest.root), record)
    costs = runner.manifest.exit_costs()
    out = {}
    for name, (outputs, final, labels) in test_sets.items():
        point = CascadeSimulator(policies, outputs, final, labels, costs).evaluate(record["chosen"]["thresholds"])
        reference = float((final.argmax(axis=1) == labels).mean())
        out[name] = {"full_accuracy": reference, "accuracy": point.accuracy, "drop_points": 100 * (reference - point.accuracy),
                     "relative_macs": point.relative_macs, "exit_counts": list(point.exit_counts)}
    return out


def leave_one_out(runner: CascadeRunner, val: tuple, test_sets: dict, plain: dict, args: argparse.Namespace) -> dict:
    """Per family: robust calibration on every other family, measured on the held-out family and on clean test."""
    plain_test = evaluate(plain, runner, test_sets)
    rows = {}
    for family in CORRUPTIONS:
        others = tuple(name for name in CORRUPTIONS if name != family)
        log(f"leave one out: robust on all but {family}")
        record = calibrate(runner, *val, ("target_drop", args.target_drop), progress=lambda message: None,
                           policy=args.policy, robust=RobustSettings(others, args.severity, slack_points=args.shift_slack))
        test = evaluate(record, runner, {CLEAN: test_sets[CLEAN], family: test_sets[family]})
        rows[family] = {"policy": record["policy"], "ensemble": record.get("ensemble"), "thresholds": record["chosen"]["thresholds"],
                        "held_out_drop_points": test[family]["drop_points"], "plain_drop_points": plain_test[family]["drop_points"],
                        "held_out_relative_macs": test[family]["relative_macs"], "clean_drop_points": test[CLEAN]["drop_points"],
                        "clean_relative_macs": test[CLEAN]["relative_macs"],
                        "extra_clean_macs": test[CLEAN]["relative_macs"] - plain_test[CLEAN]["relative_macs"]}
    return {"families": rows, "worst_held_out_drop_points": max(r["held_out_drop_points"] for r in rows.values()),
            "worst_extra_clean_macs": max(r["extra_clean_macs"] for r in rows.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--data", default="digits")
    parser.add_argument("--families", default=CALIBRATION_FAMILIES, help="families robust calibration sees")
    parser.add_argument("--severity", type=int, default=DEFAULT_SEVERITY)
    parser.add_argument("--target-drop", type=float, default=0.5)
    parser.add_argument("--policy", default="auto")
    parser.add_argument("--leave-one-out", action="store_true",
                        help="also: per family, robust calibration on all the others, measured on it")
    parser.add_argument("--shift-slack", type=float, default=0.0,
                        help="extra drop in points robust calibration allows on each corrupted set")
    parser.add_argument("--limit", type=int, default=None, help="use the first N images of val and of test")
    parser.add_argument("--tag", default="digits", help="key of this run in the results file")
    parser.add_argument("--out", default=str(RESULTS / "robust_calibration.json"))
    args = parser.parse_args()

    runner = CascadeRunner(args.bundle)
    spec = runner.manifest.input_spec
    seen = parse_families(args.families)
    val = tuple(a[: args.limit] for a in load_eval_data(args.data, "val", spec))
    test_x, test_y = (a[: args.limit] for a in load_eval_data(args.data, "test", spec))
    records = {}
    for mode, robust in (("plain", None), ("robust", RobustSettings(tuple(seen), args.severity, slack_points=args.shift_slack))):
        log(f"calibrating ({mode})")
        records[mode] = calibrate(runner, *val, ("target_drop", args.target_drop), {"name": args.data, "split": "val"},
                                  log, policy=args.policy, robust=robust)
    test_sets = {}
    for i, name in enumerate([CLEAN, *CORRUPTIONS]):
        x = test_x if name == CLEAN else corrupt_model_ready(test_x, spec.mean, spec.std, name, args.severity, TEST_SEED + i)
        test_sets[name] = (*runner.stage_outputs(x), test_y)
    results = {mode: {"policy": r["policy"], "ensemble": r.get("ensemble"), "thresholds": r["chosen"]["thresholds"], "val": r.get("robust", {}).get("sets"),
                      "test": evaluate(r, runner, test_sets)} for mode, r in records.items()}
    held_out = [name for name in CORRUPTIONS if name not in seen]
    loo = leave_one_out(runner, val, test_sets, records["plain"], args) if args.leave_one_out else None
    summary = {}
    for mode, result in results.items():
        test = result["test"]
        summary[mode] = {"clean_drop_points": test[CLEAN]["drop_points"], "clean_relative_macs": test[CLEAN]["relative_macs"],
                         "worst_seen_drop_points": max(test[f]["drop_points"] for f in seen),
                         "worst_held_out_drop_points": max(test[f]["drop_points"] for f in held_out),
                         "mean_held_out_drop_points": float(np.mean([test[f]["drop_points"] for f in held_out]))}
    summary["extra_clean_macs"] = summary["robust"]["clean_relative_macs"] - summary["plain"]["clean_relative_macs"]
    entry = {"bundle": Path(args.bundle).name, "data": args.data, "target_drop": args.target_drop, "policy": args.policy,
             "shift_slack_points": args.shift_slack,
             "severity": args.severity, "calibration_families": seen, "held_out_families": held_out,
             "val_samples": int(len(val[1])), "test_samples": int(len(test_y)), "host": platform.machine(), "summary": summary, **results,
             **({} if loo is None else {"leave_one_out": loo})}
    out = Path(args.out)
    existing = json.loads(out.read_text()) if out.is_file() else {}
    existing[args.tag] = entry
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(existing, indent=2) + "\n")
    log(f"{'set':<12}" + "".join(f"{m + ' drop':>13}{m + ' MACs':>13}" for m in results))
    for name in test_sets:
        mark = "" if name == CLEAN else (" (seen)" if name in seen else " (held out)")
        log(f"{name:<12}" + "".join(f"{results[m]['test'][name]['drop_points']:>13.2f}{results[m]['test'][name]['relative_macs']:>13.3f}"
                                     for m in results) + mark)
    if loo is not None:
        log(f"leave one out (robust on the other {len(CORRUPTIONS) - 1} families): held-out drop, clean MACs extra over plain")
        for name, row in loo["families"].items():
            log(f"  {name:<12} drop {row['held_out_drop_points']:6.2f}  (plain {row['plain_drop_points']:6.2f})  "
                f"extra clean MACs {row['extra_clean_macs']:.3f}")
    log(json.dumps(summary, indent=2))
    log(f"wrote {out} [{args.tag}]")


if __name__ == "__main__":
    main()
