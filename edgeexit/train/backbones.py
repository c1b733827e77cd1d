"""Backbone registry: name -> constructor. CIFAR-style ResNets (6n+2) and EENet-8 live here."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from edgeexit.errors import ConfigError

BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str) -> Callable:
    """Decorator adding a constructor(num_classes, in_channels, **args) to BACKBONES."""

    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        BACKBONES[name] = fn
        return fn

    return add


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (1x1 projection when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images (He et al. 2016, sec. 4.2): 3 stages of n blocks, depth 6n+2."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ConfigError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, ...), got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=False)
        self.layer1 = self._stage(width, width, blocks, 1)
        self.layer2 = self._stage(width, width * 2, blocks, 2)
        self.layer3 = self._stage(width * 2, width * 4, blocks, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(width * 4, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


def _resnet(depth: int) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int, **args) -> nn.Module:
        return CifarResNet(depth, num_classes, in_channels, **args)

    build.__doc__ = f"CIFAR-style ResNet-{depth}."
    return build


for _depth in (8, 20, 32, 44, 56, 110):
    register_backbone(f"resnet{_depth}")(_resnet(_depth))


class Residual(nn.Module):
    """branch(x) + shortcut(x): a residual block whose output is one tensor, a cut point."""

    def __init__(self, branch: nn.Module, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.branch = branch
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(x) + self.shortcut(x)


class EENet8(nn.Module):
    """EENet-8, the paper's small MNIST net (8 weight layers, widths w, 2w, 4w; w=2 in the paper).

    Layout of the authors' eenets.pytorch custom_eenet.py: conv-BN-ReLU stem; block1 =
    conv-BN-ReLU-conv plus identity; block2 and block3 = BN-ReLU-conv(stride 2)-BN-ReLU-conv
    plus a strided 1x1 projection; BN-ReLU-global pool; linear classifier. Convs keep their
    biases, so at w=2 the parameter counts are the paper's. Its two exits sit after block1
    and block2, both cut points here.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 2) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(in_channels, w, 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU()
        self.block1 = Residual(nn.Sequential(nn.Conv2d(w, w, 3, 1, 1), nn.BatchNorm2d(w), nn.ReLU(), nn.Conv2d(w, w, 3, 1, 1)))
        self.block2 = self._down_block(w)
        self.block3 = self._down_block(2 * w)
        self.head = nn.Sequential(nn.BatchNorm2d(4 * w), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(4 * w, num_classes)

    @staticmethod
    def _down_block(channels: int) -> Residual:
        out = 2 * channels
        branch = nn.Sequential(
            nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, out, 3, 2, 1),
            nn.BatchNorm2d(out), nn.ReLU(), nn.Conv2d(out, out, 3, 1, 1),
        )
        return Residual(branch, nn.Conv2d(channels, out, 1, 2, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.block3(self.block2(self.block1(x)))
        return self.fc(self.head(x))


@register_backbone("eenet8")
def eenet8(num_classes: int, in_channels: int, width: int = 2) -> nn.Module:
    """EENet-8 (MNIST-sized), `width` = the paper's --filters (2 or 4)."""
    return EENet8(num_classes, in_channels, width)


# prefix -> resolver(rest of the name) -> constructor: "torchvision:resnet18" is resolved, not listed
BACKBONE_PREFIXES: dict[str, Callable[[str], Callable[..., nn.Module]]] = {}


def register_backbone_prefix(prefix: str) -> Callable:
    """Decorator adding a resolver for names "PREFIX:NAME" to BACKBONE_PREFIXES."""

    def add(fn: Callable[[str], Callable[..., nn.Module]]) -> Callable[[str], Callable[..., nn.Module]]:
        BACKBONE_PREFIXES[prefix] = fn
        return fn

    return add


def first_conv_name(net: nn.Module) -> str | None:
    """Qualified name of the network's first Conv2d (its stem), or None."""
    return next((name for name, m in net.named_modules() if isinstance(m, nn.Conv2d)), None)


def adapt_input_channels(net: nn.Module, in_channels: int) -> nn.Module:
    """Rebuild the stem conv for `in_channels` inputs (e.g. grayscale), the rest of the network untouched.

    Chosen over repeating the gray channel three times: the same function once weights are
    loaded (pretrained.py sums RGB stem kernels, as timm's adapt_input_conv does) at a third
    of the stem's MACs, and the network stays a plain torchvision module with its own keys.
    """
    name = first_conv_name(net)
    stem = net.get_submodule(name) if name else None
    if stem is None or stem.in_channels == in_channels:
        return net
    if stem.groups != 1:
        raise ConfigError(f"cannot adapt grouped stem conv '{name}' to {in_channels} input channels")
    net.set_submodule(name, nn.Conv2d(
        in_channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding,
        stem.dilation, bias=stem.bias is not None, padding_mode=stem.padding_mode,
    ))
    return net


@register_backbone_prefix("torchvision")
def torchvision_backbone(name: str) -> Callable[..., nn.Module]:
    """Any torchvision classification model, built with weights=None: nothing is ever downloaded."""
    from torchvision import models

    if name not in models.list_models(module=models):
        raise ConfigError(f"unknown torchvision classification model '{name}' (e.g. resnet18, densenet121, "
                          f"vgg16_bn, mobilenet_v2; see torchvision.models.list_models())")
    builder = models.get_model_builder(name)

    def build(num_classes: int, in_channels: int, **args) -> nn.Module:
        return adapt_input_channels(builder(weights=None, num_classes=num_classes, **args), in_channels)

    return build


def _constructor(name: str) -> Callable[..., nn.Module]:
    prefix, sep, rest = name.partition(":")
    if sep and prefix in BACKBONE_PREFIXES:
        return BACKBONE_PREFIXES[prefix](rest)
    if name not in BACKBONES:
        prefixes = ", ".join(f"{p}:NAME" for p in BACKBONE_PREFIXES)
        raise ConfigError(f"unknown backbone '{name}'; choose from: {', '.join(BACKBONES)}, {prefixes}")
    return BACKBONES[name]


def build_backbone(name: str, num_classes: int, in_channels: int, **args) -> nn.Module:
    """Construct a backbone by registered name or PREFIX:NAME, with an error listing the valid names."""
    constructor = _constructor(name)
    try:
        return constructor(num_classes=num_classes, in_channels=in_channels, **args)
    except TypeError as exc:
        raise ConfigError(f"bad arguments for backbone '{name}': {exc}") from None
