"""model.pt round trip and the fx split of the backbone."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeexit.train.config import ModelConfig
from edgeexit.train.models import EarlyExitModel, load_model, read_checkpoint, save_model


def test_model_pt_is_a_plain_dict_that_round_trips(tiny_model_path, tmp_path):
    data = torch.load(tiny_model_path, weights_only=True)
    assert data["format"] == "edgeexit-model" and isinstance(data["config"], dict)
    assert all(isinstance(v, torch.Tensor) for v in data["state_dict"].values())
    model = load_model(tiny_model_path)
    reloaded = read_checkpoint(tiny_model_path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reloaded["state_dict"][key])
    x = torch.randn(4, *model.config.input_shape)
    with torch.no_grad():
        exits_a, final_a = model(x)
        exits_b, final_b = load_model(tiny_model_path)(x)
    assert torch.equal(final_a, final_b)
    for a, b in zip(exits_a, exits_b):
        assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_segments_chain_to_the_plain_backbone(tiny_model_path):
    model = load_model(tiny_model_path)
    x = torch.randn(3, *model.config.input_shape)
    with torch.no_grad():
        h = x
        for segment in model.segments:
            h = segment(h)
        assert torch.allclose(h, model.backbone(x), atol=1e-5)


def test_exit_costs_increase_and_end_above_one(tiny_model_path):
    costs = load_model(tiny_model_path).exit_costs()
    assert costs == sorted(costs) and 0 < costs[0] < 1
    assert costs[-1] >= 1.0  # the final stage also paid for every head it passed


class _NoisyBlock(nn.Module):
    """A residual block whose train-mode code has extra ops (drop-path style noise), so its two traces differ in shape."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        if self.training:
            y = y * (torch.rand_like(y) < 0.5) * 2
        return x + y


class _DropoutNet(nn.Module):
    """Functional dropout in its own forward (as timm's heads): fx fixes `self.training` when it traces."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.block2 = _NoisyBlock(8)
        self.block3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(self.block2(self.block1(x)), 0.5, self.training)
        return self.fc(self.block3(x).mean((2, 3)))


def _outputs_twice(model: EarlyExitModel, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [torch.cat([*(out for head in model(x)[0] for out in head), model(x)[1]], 1) for _ in range(2)]


@pytest.mark.parametrize("frozen", [False, True])
def test_segments_follow_the_backbones_mode(frozen):
    """Built in train mode, the model still evaluates (and exports) the backbone's eval-mode code: no dropout,
    the backbone's own outputs; training runs its train-mode code unless the backbone is frozen."""
    torch.manual_seed(0)
    net = _DropoutNet().train()
    config = ModelConfig(backbone="custom", cuts=["block1.1", "block2"], input_shape=(1, 16, 16), frozen_backbone=frozen)
    model = EarlyExitModel(config, backbone=net)
    x = torch.randn(4, 1, 16, 16)
    first, second = _outputs_twice(model.eval(), x)
    assert torch.equal(first, second)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[1], net.eval()(x))
    first, second = _outputs_twice(model.train(), x)
    assert torch.equal(first, second) == frozen


def test_model_pt_keeps_module_versions(tmp_path):
    """torchvision's MNASNet refuses weights without its version (the state_dict's `_metadata`): model.pt keeps it."""
    torch.manual_seed(0)
    config = ModelConfig(backbone="torchvision:mnasnet0_5", input_shape=(3, 32, 32))
    model = EarlyExitModel(config).eval()
    save_model(model, tmp_path / "model.pt")
    assert read_checkpoint(tmp_path / "model.pt")["state_dict"]._metadata["backbone"] == {"version": 2}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "model.pt")(x)[1], model(x)[1])
