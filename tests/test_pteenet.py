"""PTEENet: branches post-trained on a frozen pre-trained backbone, loaded only from local weights."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import fx, nn

from edgeexit.train.backbones import build_backbone
from edgeexit.cli import main
from edgeexit.train.cuts import CutGraph
from edgeexit.errors import ConfigError, InputError

SMALL = {"input_size": 16, "num_exits": 2, "placement": "linear"}


def _backbone_tensors(model_pt: Path) -> dict[str, torch.Tensor]:
    """The backbone's tensors as model.pt stores them, under the plain backbone's keys."""
    state = torch.load(model_pt, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}


def _assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    changed = [k for k in want if not torch.equal(got[k], want[k])]
    assert not changed, f"backbone tensors changed: {changed[:5]}"


@pytest.fixture(scope="module")
def backbone_weights(tmp_path_factory) -> Path:
    """resnet20 pre-trained (plain, no exits) on 16x16 digits: the 'user's model'."""
    from edgeexit.train.config import PRETRAIN
    from edgeexit.train.pretrained import pretrain_backbone

    out = tmp_path_factory.mktemp("pretrained") / "backbone.pt"
    pretrain_backbone(dataclasses.replace(PRETRAIN, backbone="resnet20", input_size=16, epochs=4), out, progress=False)
    return out


@pytest.fixture(scope="module")
def pteenet_model(tmp_path_factory, backbone_weights) -> Path:
    """Branches (one conv block each, cheap beside the backbone) post-trained on the frozen resnet20.

    Three warm-up epochs let the branch classifiers learn before the confidence heads meet
    the cost term; lambda 1.5 because a 99%-accurate backbone makes deferring nearly free.
    """
    from edgeexit import workflows as api
    from edgeexit.train.config import TrainSpec

    out = tmp_path_factory.mktemp("pteenet") / "model.pt"
    api.train(TrainSpec(method="pteenet", backbone="resnet20", weights=str(backbone_weights), input_size=16,
                        placement="pareto", epochs=6, warmup_epochs=3, lr=1e-2, lam=1.5, branch_channels=16, branch_depth=1),
              str(out), progress=False)
    return out


@pytest.fixture(scope="module")
def pteenet_bundle(tmp_path_factory, pteenet_model) -> Path:
    from edgeexit.export import export_bundle

    out = tmp_path_factory.mktemp("pteenet_bundle") / "bundle"
    export_bundle(pteenet_model, out)
    return out


def _original(weights: Path, name: str = "resnet20", channels: int = 1) -> nn.Module:
    from edgeexit.train.pretrained import load_backbone_weights

    net = build_backbone(name, 10, channels)
    load_backbone_weights(net, weights)
    return net.eval()


def test_torchvision_backbone_is_built_offline_for_the_data():
    net = build_backbone("torchvision:resnet18", 7, 1)
    assert net.conv1.in_channels == 1 and net.fc.out_features == 7
    assert build_backbone("torchvision:mobilenet_v2", 10, 3).features[0][0].in_channels == 3
    with pytest.raises(ConfigError, match="unknown torchvision classification model 'resnet9'"):
        build_backbone("torchvision:resnet9", 10, 3)


def test_rgb_checkpoint_on_gray_input_equals_repeating_the_channel(tmp_path):
    from edgeexit.train.pretrained import load_backbone_weights

    rgb = build_backbone("torchvision:resnet18", 10, 3).eval()
    # a DataParallel-style checkpoint dict, as torchvision's reference scripts write
    torch.save({"model": {f"module.{k}": v for k, v in rgb.state_dict().items()}, "epoch": 3}, tmp_path / "ckpt.pth")
    gray = build_backbone("torchvision:resnet18", 10, 1)
    load_backbone_weights(gray, tmp_path / "ckpt.pth")
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gray.eval()(x), rgb(x.repeat(1, 3, 1, 1)), atol=1e-4, rtol=1e-4)


def test_mismatched_weights_name_the_keys(tmp_path):
    from edgeexit.train.pretrained import load_backbone_weights

    torch.save(build_backbone("resnet20", 10, 1).state_dict(), tmp_path / "r20.pt")
    with pytest.raises(InputError, match=r"do not match .*unexpected layer1\.1\.conv1\.weight"):
        load_backbone_weights(build_backbone("resnet8", 10, 1), tmp_path / "r20.pt")
    torch.save(build_backbone("resnet8", 5, 1).state_dict(), tmp_path / "five.pt")
    with pytest.raises(InputError, match=r"wrong shape .*fc\.weight \(5, 64\) vs \(10, 64\)"):
        load_backbone_weights(build_backbone("resnet8", 10, 1), tmp_path / "five.pt")


def test_backbone_weights_unchanged_bit_for_bit(pteenet_model, backbone_weights):
    from edgeexit.train.models import load_model
    from edgeexit.train.pretrained import read_state_dict

    model = load_model(pteenet_model)
    assert model.config.frozen_backbone and model.config.exit_type == "branch"
    _assert_same_tensors(_backbone_tensors(pteenet_model), read_state_dict(backbone_weights))


def test_final_exit_is_the_original_model(pteenet_model, pteenet_bundle, backbone_weights):
    from edgeexit.train.models import load_model
    from edgeexit.runtime.cascade import CascadeRunner
    from edgeexit.runtime.datasets import load_eval_data

    original = _original(backbone_weights)
    runner = CascadeRunner(pteenet_bundle, threads=1)
    x, _ = load_eval_data("digits", "test", runner.manifest.input_spec)
    with torch.no_grad():
        want = original(torch.from_numpy(x))
        _, final = load_model(pteenet_model)(torch.from_numpy(x))
    torch.testing.assert_close(final, want, atol=0, rtol=0)
    chained = runner.predict(x, use_exits=False)  # every stage's features on to the final classifier
    np.testing.assert_array_equal(chained.predictions, want.argmax(1).numpy())


def test_branches_exit_a_real_share_early(pteenet_bundle, backbone_weights, tmp_path):
    from edgeexit.runtime.datasets import load_eval_data
    from edgeexit.runtime.manifest import load_manifest

    bundle = tmp_path / "bundle"
    shutil.copytree(pteenet_bundle, bundle)
    # as a user would: thresholds chosen on the validation split for at most 2 points below the final classifier
    calibrated = CliRunner().invoke(main, ["calibrate", str(bundle), "--data", "digits", "--split", "val", "--target-drop", "2"])
    assert calibrated.exit_code == 0, calibrated.output
    result = CliRunner().invoke(main, ["run", str(bundle), "--data", "digits", "--batch-size", "32",
                                       "--threads", "1", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    x, y = load_eval_data("digits", "test", load_manifest(bundle).input_spec)
    with torch.no_grad():
        backbone_accuracy = float((_original(backbone_weights)(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    early = sum(report["exit_counts"][:-1]) / sum(report["exit_counts"])
    assert early >= 0.2, report["exit_counts"]
    assert report["relative_macs"] < 1.0
    assert report["accuracy"] >= backbone_accuracy - 0.05


def test_torchvision_backbone_trains_exports_and_runs(tmp_path):
    from edgeexit import workflows as api
    from edgeexit.export import export_bundle
    from edgeexit.train.config import TrainSpec
    from edgeexit.train.pretrained import read_state_dict, save_state_dict
    from edgeexit.runtime.cascade import CascadeRunner
    from edgeexit.runtime.datasets import load_eval_data

    save_state_dict(build_backbone("torchvision:resnet18", 10, 1), tmp_path / "r18.pt")
    api.train(TrainSpec(method="pteenet", backbone="torchvision:resnet18", weights=str(tmp_path / "r18.pt"), epochs=1,
                        branch_channels=8, branch_depth=1, **{**SMALL, "exit_at": "layer1.0,layer2.0"}),
              str(tmp_path / "model.pt"), progress=False)
    manifest = export_bundle(tmp_path / "model.pt", tmp_path / "bundle")
    assert [s.exit.cut for s in manifest.manifest.stages[:-1]] == ["layer1.0", "layer2.0"]
    runner = CascadeRunner(tmp_path / "bundle", threads=1)
    x, _ = load_eval_data("digits", "test", runner.manifest.input_spec)
    assert len(runner.predict(x[:16]).predictions) == 16
    _assert_same_tensors(_backbone_tensors(tmp_path / "model.pt"), read_state_dict(tmp_path / "r18.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torchvision:resnet18", "torchvision:mobilenet_v2"])
def test_torchvision_backbone_at_224_exports_verified_and_runs(tmp_path, name):
    from edgeexit.train.data import load_data
    from edgeexit.export import export_bundle
    from edgeexit.train.models import save_model
    from edgeexit.train.pretrained import save_state_dict
    from edgeexit.runtime.cascade import CascadeRunner
    from edgeexit.runtime.datasets import load_eval_data
    from edgeexit.train.assembly import build_model

    save_state_dict(build_backbone(name, 10, 3), tmp_path / "w.pt")
    data = load_data("digits", input_size=224, channels=3)
    model = build_model(data, name, "branch", "pareto", 2, method="pteenet", weights=str(tmp_path / "w.pt"),
                        exit_args={"channels": 16, "depth": 1})
    save_model(model.eval(), tmp_path / "model.pt")
    manifest = export_bundle(tmp_path / "model.pt", tmp_path / "bundle")  # verifies parity, fails on mismatch
    assert manifest.manifest.input_shape == (3, 224, 224)
    runner = CascadeRunner(tmp_path / "bundle", threads=2)
    x, _ = load_eval_data("digits", "test", runner.manifest.input_spec)
    assert len(runner.predict(x[:4]).predictions) == 4


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.sum() > 0:
            x = x.relu()
        return self.fc(x.mean((2, 3)))


def test_untraceable_backbone_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot be traced by torch.fx"):
        CutGraph(Untraceable(), (1, 16, 16))
    with pytest.raises(fx.proxy.TraceError):
        fx.symbolic_trace(Untraceable())


def _one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_cli_errors_are_one_line(tmp_path):
    torch.save(build_backbone("resnet20", 10, 1).state_dict(), tmp_path / "r20.pt")
    train = ["train", "--method", "pteenet", "--backbone", "resnet8", "--input-size", "16", "--epochs", "1",
             "--out", str(tmp_path / "model.pt")]
    assert "do not match resnet8: unexpected layer1.1" in _one_line_error([*train, "--weights", str(tmp_path / "r20.pt")])
    assert "weights file not found" in _one_line_error([*train, "--weights", str(tmp_path / "nope.pt")])
    assert "--weights FILE" in _one_line_error(train)
    torch.save(build_backbone("resnet8", 10, 1).state_dict(), tmp_path / "r8.pt")
    line = _one_line_error([*train, "--weights", str(tmp_path / "r8.pt"), "--exit-at", "layer1.0,layer9"])
    assert "unknown cut point 'layer9'" in line and "layer2.0" in line
    untraceable = f"module:{__name__}:Untraceable"  # this test file, as pytest imported it
    assert "cannot be traced by torch.fx" in _one_line_error(["cuts", "--backbone", untraceable, "--input-size", "16"])
    assert "unknown torchvision classification model" in _one_line_error(["cuts", "--backbone", "torchvision:nope"])
    assert not (tmp_path / "model.pt").exists()
