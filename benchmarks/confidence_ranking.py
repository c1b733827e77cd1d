"""How well each exit's scores rank its own correctness: AUROC of "this exit's prediction is right".

For every exit of a bundle with class logits: the learned confidence (where the exit has one),
max-softmax and entropy, on a labeled split (default digits val), over all inputs and over the
inputs exit 0 would keep (its lowest 30/50/70% by max-softmax), which are the ones a later exit
actually decides on. 0.5 is chance, below 0.5 inverted. Runtime only (no torch).

    python benchmarks/confidence_ranking.py bundle/ --data digits --split val --tag eenet_v4
    python benchmarks/confidence_ranking.py bundle/ --data npz:../shared/data/fashion-mnist-60k.npz --split val

Writes benchmarks/results/confidence_ranking_TAG.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edgeexit.runtime.cascade import CascadeRunner
from edgeexit.runtime.datasets import load_eval_data
from edgeexit.runtime.metrics import auroc, exit_score, ranking_auroc, scored_policies
from edgeexit.runtime.policies import get_policy

RESULTS = Path(__file__).parent / "results"
KEPT_SHARES = (0.3, 0.5, 0.7)  # exit 0's lowest shares by max-softmax


def kept_auroc(exit_outputs, labels) -> dict[str, dict[str, float]]:
    """AUROC at exits >= 1 among the inputs exit 0 ranks lowest by max-softmax (those it would send on)."""
    softmax = get_policy("max_softmax")(0.5)
    first = exit_score(softmax, exit_outputs[0])
    table = {}
    for share in KEPT_SHARES:
        kept = first <= np.quantile(first, share)
        for k, outputs in enumerate(exit_outputs[1:], start=1):
            right = outputs["logits"].argmax(axis=1)[kept] == labels[kept]
            row = {"accuracy": float(right.mean())}
            for name in scored_policies():
                policy = get_policy(name)(get_policy(name).default_threshold)
                if set(policy.roles) <= set(outputs):
                    row[name] = auroc(exit_score(policy, {r: v[kept] for r, v in outputs.items()}), right)
            table[f"exit {k}, exit 0's lowest {share:.0%}"] = row
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--split", default="val")
    parser.add_argument("--tag", default="bundle", help="results file suffix")
    args = parser.parse_args()
    runner = CascadeRunner(args.bundle, threads=1)
    x, y = load_eval_data(args.data, args.split, runner.manifest.input_spec)
    exit_outputs, final = runner.stage_outputs(x)
    if "logits" not in exit_outputs[0]:
        raise SystemExit(f"error: {args.bundle}'s exits have no class logits to rank (method {runner.manifest.model.method})")
    rows = {f"exit {k}": row for k, row in enumerate(ranking_auroc(exit_outputs, y))}
    rows.update(kept_auroc(exit_outputs, y))
    record = {"bundle": args.bundle, "data": args.data, "split": args.split, "inputs": len(y),
              "final_accuracy": float((final.argmax(axis=1) == y).mean()), "auroc": rows}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"confidence_ranking_{args.tag}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    names = ["accuracy", *scored_policies()]
    print(f"{'':32s}" + "".join(f"{n:>12s}" for n in names))
    for label, row in rows.items():
        print(f"{label:32s}" + "".join(f"{row[n]:12.3f}" if n in row else f"{'-':>12s}" for n in names))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
