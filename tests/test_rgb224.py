"""224x224 RGB end to end, as a user with their own photos goes: an image folder, PTEENet branches on a frozen timm model
loaded with --weights, train, export (verified), quantize, static-batch, run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edgeexit.cli import main
from edgeexit.runtime.manifest import load_manifest

pytest.importorskip("timm")

BACKBONE = "timm:test_efficientnet"
CLASSES = ("red", "green", "blue")


def write_photos(root: Path, per_class: int = 8, size: int = 224) -> None:
    """root/CLASS/*.jpg: noisy 224 px RGB images, each class brightest in its own channel."""
    rng = np.random.default_rng(0)
    for channel, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = rng.integers(0, 120, (size, size, 3))
            image[..., channel] += 120
            Image.fromarray(image.astype(np.uint8)).save(root / name / f"{i}.jpg")


def cli(*args: object) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_photos_at_224_pteenet_on_a_frozen_timm_model(tmp_path):
    from edgeexit.train.backbones import build_backbone

    photos = tmp_path / "photos"
    write_photos(photos)
    data = f"folder:{photos}"
    torch.manual_seed(0)
    backbone = build_backbone(BACKBONE, len(CLASSES), 3)
    torch.save({"state_dict": backbone.state_dict(), "epoch": 1, "arch": "test_efficientnet"}, tmp_path / "backbone.pth")
    cli("train", "--data", data, "--input-size", "224", "--method", "pteenet", "--backbone", BACKBONE, "--weights", tmp_path / "backbone.pth",
        "--epochs", "1", "--num-exits", "2", "--branch-channels", "8", "--branch-depth", "1", "--out", tmp_path / "model.pt")
    model = torch.load(tmp_path / "model.pt", map_location="cpu", weights_only=True)
    assert tuple(model["config"]["input_shape"]) == (3, 224, 224) and model["config"]["frozen_backbone"]
    backbone_state = {k.removeprefix("backbone."): v for k, v in model["state_dict"].items() if k.startswith("backbone.")}
    assert all(torch.equal(backbone_state[k], v) for k, v in backbone.state_dict().items())  # frozen: bit for bit

    assert "verified" in cli("export", tmp_path / "model.pt", tmp_path / "bundle")
    assert load_manifest(tmp_path / "bundle").input_spec.shape[1:] == (3, 224, 224)
    # --budget 1: one epoch on 16 photos leaves exits that rarely fire, and then the default budget (what the fp32
    # cascade spends, its branch heads included) is above the full model's MACs
    cli("quantize", tmp_path / "bundle", tmp_path / "int8", "--data", data, "--split", "val", "--budget", "1")
    cli("static-batch", tmp_path / "bundle", tmp_path / "b1", "--batch", "1")
    for bundle in ("bundle", "int8", "b1"):
        out = cli("run", tmp_path / bundle, "--data", data, "--split", "test")
        assert "accuracy" in out, out
