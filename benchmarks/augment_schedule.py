"""Does augmentation pay on a small image set, and from how many epochs? `pretrain` with --augment none vs basic.

A seeded subset of a Fashion-MNIST .npz (x uint8 (N, 28, 28), y, classes; by default
../shared/data/fashion-mnist-60k.npz beside the repository) is written so that edgeexit's
70/15/15 split leaves --images training images; each schedule in --epochs trains the plain
backbone (`edgeexit pretrain`: SGD Nesterov, one-cycle) without augmentation and with `basic`
(pad-and-crop + horizontal flip, which keeps Fashion-MNIST's labels), and reports val and test
accuracy. edgeexit.train.augment.default_augment encodes the result.

    python benchmarks/augment_schedule.py --images 6000 --backbone resnet8 --epochs 4,15,30
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from edgeexit.train.config import PRETRAIN
from edgeexit.train.pretrained import pretrain_backbone

HERE = Path(__file__).resolve().parent


def subset(source: Path, images: int, seed: int, folder: Path) -> Path:
    """An .npz of the first ceil(images / 0.7) samples of a seeded permutation of `source` (70% of them: the training split)."""
    data = np.load(source)
    keep = np.sort(np.random.default_rng(seed).permutation(len(data["y"]))[: int(np.ceil(images / 0.7))])
    path = folder / f"subset-{images}.npz"
    np.savez(path, x=data["x"][keep], y=data["y"][keep], classes=data["classes"])
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "fashion-mnist-60k.npz")
    parser.add_argument("--images", type=int, default=6000, help="training images (the subset's 70%% split)")
    parser.add_argument("--backbone", default="resnet8")
    parser.add_argument("--epochs", default="4,15,30", help="comma-separated schedules")
    parser.add_argument("--seed", type=int, default=1, help="subset seed (training runs use seed 0)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "augment_schedule.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = subset(args.data, args.images, args.seed, Path(tmp))
        for epochs in (int(e) for e in args.epochs.split(",")):
            for augment in ("none", "basic"):
                spec = dataclasses.replace(PRETRAIN, backbone=args.backbone, data=f"npz:{data}", epochs=epochs,
                                           augment=augment, flip=True)
                result = pretrain_backbone(spec, Path(tmp) / "backbone.pt", progress=False)
                rows.append({"epochs": epochs, "augment": augment, "val_accuracy": result["val_accuracy"],
                             "test_accuracy": result["test_accuracy"]})
                print(f"{epochs:>3} epochs  {augment:<6} val {result['val_accuracy']:.4f}  test {result['test_accuracy']:.4f}",
                      file=sys.stderr, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"setup": {**{k: str(v) for k, v in vars(args).items()}, "data": args.data.name}, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
