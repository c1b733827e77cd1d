"""Class exclusion, per exit: how many classes an input has left, at the bundle's betas and after the authors' beta search.

Runs a class-exclusion bundle once over a calibration split and an evaluation split (runtime
only, no torch), searches beta_k per exit on the calibration split as `edgeexit calibrate
--target-drop` does (runtime.calibrate.search_betas), and reports on the evaluation split:
accuracy, relative MACs, exits per stage, the head's own argmax accuracy (how well each
exclusion head ranks the true class first), the sigmoid score of the true class vs the
others, and the histogram of classes left per exit (runtime.metrics.classes_left).

    edgeexit train --data digits --backbone resnet20 --method exclusion --epochs 8 --out model.pt
    edgeexit export model.pt bundle/
    python benchmarks/exclusion.py bundle/ --data digits --target-drop 0.5 --tag digits

Writes benchmarks/results/exclusion_TAG.json and prints a summary.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edgeexit.runtime.calibrate import search_betas, with_betas
from edgeexit.runtime.cascade import CascadeRunner
from edgeexit.runtime.datasets import load_eval_data
from edgeexit.runtime.metrics import classes_left
from edgeexit.runtime.policies import sigmoid
from edgeexit.runtime.simulate import CascadeSimulator

RESULTS = Path(__file__).parent / "results"


def head_summary(exit_outputs, labels) -> list[dict]:
    """Per exit: argmax accuracy of the exclusion scores, and quartiles of the true class's and the other classes' sigmoid."""
    rows = []
    for outputs in exit_outputs:
        scores = sigmoid(outputs["exclusion_logits"])
        true = scores[np.arange(len(labels)), labels]
        other = np.delete(scores, np.arange(len(labels)) * scores.shape[1] + labels)
        rows.append({"argmax_accuracy": float((scores.argmax(axis=1) == labels).mean()),
                     "true_score_quartiles": np.quantile(true, [0.25, 0.5, 0.75]).round(4).tolist(),
                     "other_score_quartiles": np.quantile(other, [0.25, 0.5, 0.75]).round(4).tolist()})
    return rows


def operating_point(policies, outputs, final, labels, costs) -> dict:
    """Accuracy, relative MACs, exits per stage and the classes-left histogram of these policies on one split."""
    point = CascadeSimulator(policies, outputs, final, labels, costs).evaluate([p.threshold for p in policies])
    return {**point.as_dict(), "betas": [p.args["beta"] for p in policies],
            "classes_left": classes_left(policies, outputs, final.shape[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--calibrate-split", default="val")
    parser.add_argument("--split", default="test", help="evaluation split")
    parser.add_argument("--target-drop", type=float, default=0.5, help="beta search tolerance, accuracy points")
    parser.add_argument("--tag", default="bundle", help="results file suffix")
    args = parser.parse_args()
    runner = CascadeRunner(args.bundle, threads=1)
    if runner.policies[0].name != "exclusion":
        raise SystemExit(f"error: {args.bundle} is not a class-exclusion bundle (policy {runner.policies[0].name})")
    costs = runner.manifest.exit_costs()
    splits = {}
    for split in (args.calibrate_split, args.split):
        x, y = load_eval_data(args.data, split, runner.manifest.input_spec)
        outputs, final = runner.stage_outputs(x)
        splits[split] = (outputs, final, y)
    record = search_betas(runner.policies, *splits[args.calibrate_split], costs, args.target_drop)
    searched = with_betas(runner.policies, record["chosen"]["betas"])
    outputs, final, labels = splits[args.split]
    result = {
        "bundle": args.bundle, "data": args.data, "calibrate_split": args.calibrate_split, "split": args.split,
        "target_drop": args.target_drop, "cuts": list(runner.manifest.model.cuts), "exit_costs": list(costs),
        "final_accuracy": float((final.argmax(axis=1) == labels).mean()),
        "heads": head_summary(outputs, labels),
        "bundle_betas": operating_point(runner.policies, outputs, final, labels, costs),
        "searched_betas": {**operating_point(searched, outputs, final, labels, costs),
                           "calibration_accuracy": record["chosen"]["accuracy"],
                           "calibration_relative_macs": record["chosen"]["relative_macs"]},
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"exclusion_{args.tag}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.bundle}: cuts {', '.join(result['cuts'])}; final classifier {result['final_accuracy']:.4f} on {args.split}")
    for k, head in enumerate(result["heads"]):
        print(f"  exit {k}: head argmax accuracy {head['argmax_accuracy']:.3f}, true-class score median "
              f"{head['true_score_quartiles'][1]:.3f}, other classes' median {head['other_score_quartiles'][1]:.3f}")
    for name in ("bundle_betas", "searched_betas"):
        point = result[name]
        print(f"  {name}: betas {', '.join(f'{b:.2f}' for b in point['betas'])} -> accuracy {point['accuracy']:.4f} at "
              f"{point['relative_macs']:.3f} relative MACs, exits {point['exit_counts']}")
        for k, hist in enumerate(point["classes_left"]):
            print(f"    exit {k}: inputs with 1..{len(hist)} classes left: {hist}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
