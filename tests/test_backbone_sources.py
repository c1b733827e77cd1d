"""Backbones from anywhere: timm:NAME, module:PKG.MODULE:FACTORY, pt2:PATH, and --weights in timm's and torchvision's
checkpoint layouts. Each source trains one epoch, exports verified, passes `verify` and runs; bad input is one line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from edgeexit.cli import main
from edgeexit.errors import ConfigError, InputError
from edgeexit.train.backbones import BACKBONES, build_backbone, resolve_backbone
from edgeexit.train.cuts import CutGraph
from edgeexit.train.pretrained import load_backbone_weights

pytest.importorskip("timm")

TINY_TIMM = "timm:test_efficientnet"  # timm's own 100k-parameter test model
TRAIN = ["--data", "digits", "--input-size", "32", "--epochs", "1", "--num-exits", "2", "--placement", "linear"]


def cli(*args: str) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def one_line_error(*args: str) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def model_config(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["config"]


def train_export_verify_run(tmp_path: Path, *train_args: str) -> dict:
    """The user's whole path: train 1 epoch, export (verified against PyTorch), `verify`, `run`; model.pt's config."""
    cli("train", *TRAIN, *train_args, "--out", tmp_path / "model.pt")
    assert "verified" in cli("export", tmp_path / "model.pt", tmp_path / "bundle")
    cli("verify", tmp_path / "bundle")
    assert "accuracy" in cli("run", tmp_path / "bundle", "--data", "digits", "--split", "test")
    return model_config(tmp_path / "model.pt")


def test_sources_are_registry_entries_with_their_argument():
    assert {"timm:NAME", "module:PKG.MODULE:FACTORY", "pt2:PATH", "torchvision:NAME"} <= set(BACKBONES.names())
    with pytest.raises(ValueError, match="already registered"):
        BACKBONES.register("resnet20", lambda num_classes, in_channels: nn.Identity())
    with pytest.raises(ConfigError, match="backbone 'timm:' needs a NAME after 'timm:'"):
        resolve_backbone("timm:")


@pytest.mark.slow
def test_timm_model_trains_exports_verifies_and_runs(tmp_path):
    import timm

    config = train_export_verify_run(tmp_path, "--backbone", TINY_TIMM)
    assert config["backbone_source"] == {"package": "timm", "version": timm.__version__}


def test_timm_models_build_offline_and_fx_leaves_come_from_timms_list():
    net = build_backbone(TINY_TIMM, 7, 1)
    assert net.conv_stem.in_channels == 1 and net.get_classifier().out_features == 7
    # mobilevit's attention has data-dependent control flow: traced only with timm's no-trace modules as leaves
    graph = CutGraph(build_backbone("timm:mobilevit_xxs", 10, 3), (3, 64, 64))
    assert [p.name for p in graph.candidates][-3:] == ["stages.1", "stages.2", "stages.3"]
    with pytest.raises(ConfigError, match="unknown timm model 'resnet9'"):
        build_backbone("timm:resnet9", 10, 3)
    with pytest.raises(ConfigError, match="pretrained=False"):
        build_backbone(TINY_TIMM, 10, 3, pretrained=True)


USER_MODULE = '''
import torch
from torch import nn


class Gate(nn.Module):
    def forward(self, x):
        return x.relu() if x.sum() > 0 else x  # data-dependent: fx cannot trace it


def make(num_classes, in_channels, width=8):
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


def gated(num_classes, in_channels):
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), Gate(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))


def fixed():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> str:
    """A module the user wrote, importable from tmp_path (as from their own package)."""
    name = f"user_nets_{tmp_path.name.replace('-', '_')}"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    yield name
    sys.modules.pop(name, None)


@pytest.mark.slow
def test_module_factory_trains_exports_and_export_elsewhere_says_what_to_install(tmp_path, user_module, monkeypatch):
    config = train_export_verify_run(tmp_path, "--backbone", f"module:{user_module}:make", "--backbone-args", '{"width": 6}',
                                     "--exit-at", "2,5")
    assert config["backbone"] == f"module:{user_module}:make" and config["backbone_args"] == {"width": 6}
    assert config["backbone_source"]["module"] == user_module
    # on a machine without the module, export fails in one line that says what to do
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path / "src")])
    sys.modules.pop(user_module, None)
    line = one_line_error("export", tmp_path / "model.pt", tmp_path / "bundle2")
    assert f"module:{user_module}:make' cannot be imported" in line and "PYTHONPATH" in line
    assert not (tmp_path / "bundle2").exists()


def test_module_source_errors_are_one_line(user_module):
    with pytest.raises(ConfigError, match="must read module:PKG.MODULE:FACTORY"):
        resolve_backbone(f"module:{user_module}")
    with pytest.raises(ConfigError, match="has no callable 'nope'"):
        resolve_backbone(f"module:{user_module}:nope")
    with pytest.raises(ConfigError, match="No module named 'no_such_pkg'.*install the package"):
        resolve_backbone("module:no_such_pkg.nets:make")
    with pytest.raises(ConfigError, match="bad arguments for backbone"):
        build_backbone(f"module:{user_module}:make", 10, 1, depth=3)
    # the module that still cannot be traced is named, with its type
    with pytest.raises(ConfigError, match=r"cannot be traced by torch.fx in module '1' \(Gate\)"):
        CutGraph(build_backbone(f"module:{user_module}:gated", 10, 1), (1, 16, 16))


def test_factory_ignoring_the_class_count_is_refused(tmp_path, user_module):
    line = one_line_error("train", *TRAIN, "--backbone", f"module:{user_module}:fixed", "--out", tmp_path / "m.pt")
    assert "outputs shape (3,) per input; the data has 10 classes" in line, line
    assert not (tmp_path / "m.pt").exists()


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block2(self.block1(self.stem(x))).mean((2, 3)))


def save_program(path: Path, net: nn.Module, batch_dim: bool = True) -> Path:
    shapes = ({0: torch.export.Dim("batch")},) if batch_dim else None
    torch.export.save(torch.export.export(net.eval(), (torch.zeros(2, 1, 32, 32),), dynamic_shapes=shapes), path)
    return path


def test_program_cut_points_come_from_its_graph(tmp_path):
    torch.manual_seed(0)
    net = SmallNet().eval()
    program = build_backbone(f"pt2:{save_program(tmp_path / 'net.pt2', net)}", 10, 1)
    eager, graph = CutGraph(net, (1, 32, 32)), CutGraph(program, (1, 32, 32))
    assert [p.name for p in graph.candidates] == [p.name for p in eager.candidates] == ["stem.2", "block1.2"]
    assert graph.full_macs == eager.full_macs and graph.output_shape == (10,)
    assert program.state_dict().keys() == net.state_dict().keys()  # --weights files of the original model fit
    x = torch.randn(3, 1, 32, 32)
    torch.testing.assert_close(program(x), net(x))


@pytest.mark.slow
def test_program_trains_exports_and_a_changed_file_is_refused(tmp_path):
    torch.manual_seed(0)
    path = save_program(tmp_path / "net.pt2", SmallNet())
    config = train_export_verify_run(tmp_path, "--backbone", f"pt2:{path}", "--exit-at", "stem.2,block1.2")
    assert config["backbone_source"] == {"sha256": resolve_backbone(f"pt2:{path}").source["sha256"]}
    save_program(path, SmallNet())  # other weights: another program
    line = one_line_error("export", tmp_path / "model.pt", tmp_path / "bundle2")
    assert "is not the program this model was trained on" in line


def test_program_errors_are_one_line(tmp_path):
    fixed = save_program(tmp_path / "fixed.pt2", SmallNet(), batch_dim=False)
    assert "export it with a dynamic batch dim" in one_line_error("train", *TRAIN, "--backbone", f"pt2:{fixed}",
                                                                  "--out", tmp_path / "m.pt")
    assert "torch.export program not found" in one_line_error("cuts", "--backbone", f"pt2:{tmp_path / 'nope.pt2'}")
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="cannot read .* as a torch.export program"):
        build_backbone(f"pt2:{tmp_path / 'junk.pt2'}", 10, 1)


def _outputs(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net.eval()(x)


@pytest.mark.parametrize("layout", ["timm", "torchvision", "safetensors"])
def test_weights_read_timm_and_torchvision_checkpoints(tmp_path, layout):
    """timm's train.py and torchvision's reference scripts save a dict with the weights under 'state_dict' / 'model'
    and their argparse arguments beside them; hub files are bare state_dicts, often .safetensors."""
    source = build_backbone(TINY_TIMM, 10, 3)
    state = source.state_dict()
    args = argparse.Namespace(model="test_efficientnet", lr=0.1, epochs=3)
    if layout == "timm":
        path = tmp_path / "model_best.pth.tar"
        torch.save({"epoch": 3, "arch": "test_efficientnet", "state_dict": state, "state_dict_ema": state,
                    "optimizer": {"state": {}, "param_groups": []}, "version": 2, "args": args, "metric": 0.5}, path)
    elif layout == "torchvision":
        path = tmp_path / "checkpoint.pth"
        torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "optimizer": {}, "lr_scheduler": {},
                    "epoch": 3, "args": args}, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    target = build_backbone(TINY_TIMM, 10, 3)
    load_backbone_weights(target, path)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_outputs(target, x), _outputs(source, x))


def test_weights_without_module_versions_load_into_a_module_that_reads_them(tmp_path):
    """torchvision's MNASNet reads its version from the state_dict's `_metadata`, which .safetensors never holds."""
    from safetensors.torch import save_file

    source = build_backbone("torchvision:mnasnet0_5", 10, 3)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "mnasnet.safetensors")
    target = build_backbone("torchvision:mnasnet0_5", 10, 3)
    load_backbone_weights(target, tmp_path / "mnasnet.safetensors")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_outputs(target, x), _outputs(source, x))


def test_weights_with_wrong_keys_are_one_line_naming_them(tmp_path):
    from safetensors.torch import save_file

    state = build_backbone(TINY_TIMM, 10, 1).state_dict()
    state["head.extra.weight"] = torch.zeros(1)
    del state["conv_stem.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "wrong.safetensors")
    line = one_line_error("train", *TRAIN, "--method", "pteenet", "--backbone", TINY_TIMM,
                          "--weights", tmp_path / "wrong.safetensors", "--out", tmp_path / "m.pt")
    assert "missing conv_stem.weight" in line and "unexpected head.extra.weight" in line
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    assert "cannot read weights" in one_line_error("train", *TRAIN, "--method", "pteenet", "--backbone", TINY_TIMM,
                                                   "--weights", tmp_path / "junk.safetensors", "--out", tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_backbone_args_must_be_a_json_object(tmp_path):
    assert "--backbone-args must be a JSON object" in one_line_error("train", *TRAIN, "--backbone-args", "{width: 4}")
