"""Backbone registry: name -> constructor. CIFAR-style ResNets (6n+2) and EENet-8 live here, and the
`NAME:ARG` sources that build a user's own model: torchvision:, timm:, module: and pt2: (a torch.export program).

A constructor takes (num_classes, in_channels, **args). A source entry resolves its ARG to a
`Backbone`: the constructor plus the provenance model.pt records (package versions, a program's
sha256), which `export` checks when it rebuilds the model elsewhere.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import fx, nn

from edgeexit.errors import ConfigError, InputError, first_line
from edgeexit.extras import require
from edgeexit.registry import Registry

Constructor = Callable[..., nn.Module]


@dataclass(frozen=True)
class Backbone:
    """A resolved backbone name: how to build it, and where it came from (recorded in model.pt)."""

    build: Constructor
    source: dict[str, Any] = field(default_factory=dict)


# plain names map to a Constructor; `NAME:ARG` sources map to resolver(ARG, recorded source) -> Backbone
BACKBONES: Registry[Callable] = Registry("backbone")


def register_backbone(name: str) -> Callable[[Constructor], Constructor]:
    """Decorator adding a constructor(num_classes, in_channels, **args) under `name`."""
    return BACKBONES.register(name)


def register_backbone_source(name: str, arg: str) -> Callable:
    """Decorator adding a resolver(ARG, recorded source dict) -> Backbone for names `name:ARG`."""
    return BACKBONES.register(name, arg=arg)


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


@register_backbone_source("torchvision", "NAME")
def torchvision_backbone(name: str, recorded: dict[str, Any]) -> Backbone:
    """Any torchvision classification model, built with weights=None: nothing is ever downloaded."""
    import torchvision
    from torchvision import models

    if name not in models.list_models(module=models):
        raise ConfigError(f"unknown torchvision classification model '{name}' (e.g. resnet18, densenet121, "
                          f"vgg16_bn, mobilenet_v2; see torchvision.models.list_models())")
    builder = models.get_model_builder(name)

    def build(num_classes: int, in_channels: int, **args) -> nn.Module:
        return adapt_input_channels(builder(weights=None, num_classes=num_classes, **args), in_channels)

    return Backbone(build, {"package": "torchvision", "version": torchvision.__version__})


@register_backbone_source("timm", "NAME")
def timm_backbone(name: str, recorded: dict[str, Any]) -> Backbone:
    """Any timm model, built with pretrained=False (nothing downloaded); weights come from --weights."""
    pin = f"timm=={recorded['version']}" if recorded.get("version") else '"edgeexit[timm]"'
    timm = require("timm", f"backbone 'timm:{name}'", f"pip install {pin}")
    if not timm.is_model(name):
        raise ConfigError(f"unknown timm model '{name}' (e.g. resnet18, mobilenetv3_small_100, efficientnet_b0; "
                          f"see timm.list_models())")

    def build(num_classes: int, in_channels: int, **args) -> nn.Module:
        if args.get("pretrained"):
            raise ConfigError("timm backbones are built with pretrained=False (nothing is downloaded): "
                              "pass a local checkpoint with --weights FILE")
        args.pop("pretrained", None)
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **args)

    return Backbone(build, {"package": "timm", "version": timm.__version__})


def _distribution(module: str) -> dict[str, str]:
    """The installed distribution (and version) that provides `module`, when pip knows it."""
    for dist in importlib.metadata.packages_distributions().get(module.split(".")[0], []):
        return {"distribution": dist, "version": importlib.metadata.version(dist)}
    return {}


@register_backbone_source("module", "PKG.MODULE:FACTORY")
def module_backbone(spec: str, recorded: dict[str, Any]) -> Backbone:
    """Any importable callable returning an nn.Module; it gets num_classes / in_channels when it takes them.

    The current folder is importable too, as under `python -m`. model.pt records the import
    path, the arguments and the providing distribution, so `export` elsewhere says what to install.
    """
    module_name, sep, attr = spec.partition(":")
    if not (sep and module_name and attr):
        raise ConfigError(f"backbone 'module:{spec}' must read module:PKG.MODULE:FACTORY (e.g. module:mypkg.nets:make_net)")
    here = os.getcwd()
    try:
        sys.path.insert(0, here)
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = (f"pip install {recorded['distribution']}=={recorded['version']}" if recorded.get("distribution")
                else f"install the package that provides '{module_name}' or add its folder to PYTHONPATH")
        raise ConfigError(f"backbone 'module:{spec}' cannot be imported ({first_line(exc)}): {hint}") from None
    except Exception as exc:  # the user's module ran and raised
        raise ConfigError(f"importing {module_name} for backbone 'module:{spec}' failed: {type(exc).__name__}: {first_line(exc)}") from None
    finally:
        sys.path.remove(here)
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise ConfigError(f"backbone 'module:{spec}': {module_name} has no callable '{attr}'")
    try:
        takes = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins and some C extensions have no signature
        takes = {}

    def build(num_classes: int, in_channels: int, **args) -> nn.Module:
        sizes = {k: v for k, v in (("num_classes", num_classes), ("in_channels", in_channels)) if k in takes and k not in args}
        net = factory(**sizes, **args)
        if not isinstance(net, nn.Module):
            raise ConfigError(f"backbone 'module:{spec}' returned a {type(net).__name__}, not a torch.nn.Module")
        return net

    return Backbone(build, {"module": module_name, "factory": attr, **_distribution(module_name)})


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_program(path: Path) -> fx.GraphModule:
    """A torch.export.save program as a plain fx.GraphModule: its aten graph with the original parameter names.

    The graph keeps each node's nn_module_stack, from which cuts.py names cut points. Its
    batch dim must be dynamic: training and the exported graphs use batches of any size.
    """
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # zip, pickle and schema errors come in many types
        raise InputError(f"cannot read {path} as a torch.export program ({first_line(exc)})") from None
    inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
    if len(inputs) != 1:
        raise ConfigError(f"{path} takes {len(inputs)} inputs; a backbone program takes one image batch")
    shape = getattr(inputs[0].meta.get("val"), "shape", ())
    if len(shape) != 4 or isinstance(shape[0], int):
        raise ConfigError(f"{path} has input shape {tuple(shape)}; export it with a dynamic batch dim, e.g. "
                          f"torch.export.export(net, (x,), dynamic_shapes=({{0: torch.export.Dim('batch')}},))")
    unlifted = program.module()
    graph, env = fx.Graph(), {}
    for node in unlifted.graph.nodes:
        if node.op == "call_module":  # the program's shape-guard check (_guards_fn): export re-derives guards
            continue
        if node.op == "output":
            out = node.args[0]
            graph.output(env[out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out])
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(unlifted, graph)


@register_backbone_source("pt2", "PATH")
def pt2_backbone(path: str, recorded: dict[str, Any]) -> Backbone:
    """A program written by torch.export.save; model.pt records its sha256 and export refuses a changed file."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"torch.export program not found: {path}")
    digest = sha256_of(file)
    if recorded.get("sha256") not in (None, digest):
        raise InputError(f"{path} is not the program this model was trained on (sha256 {digest[:12]}..., "
                         f"model.pt recorded {recorded['sha256'][:12]}...)")

    def build(num_classes: int, in_channels: int, **args) -> nn.Module:
        if args:
            raise ConfigError(f"backbone 'pt2:{path}' takes no --backbone-args (the program is fixed), got {sorted(args)}")
        return load_program(file)

    return Backbone(build, {"sha256": digest})


def resolve_backbone(name: str, recorded: dict[str, Any] | None = None) -> Backbone:
    """A registered name or `SOURCE:ARG` as a Backbone; `recorded` is the source model.pt holds, checked against it."""
    entry, arg = BACKBONES.resolve(name)
    return Backbone(entry) if arg is None else entry(arg, recorded or {})


def create_backbone(backbone: Backbone, name: str, num_classes: int, in_channels: int, **args) -> nn.Module:
    """Build a resolved backbone; bad arguments are one ConfigError naming it."""
    try:
        return backbone.build(num_classes=num_classes, in_channels=in_channels, **args)
    except TypeError as exc:
        raise ConfigError(f"bad arguments for backbone '{name}': {first_line(exc)}") from None


def build_backbone(name: str, num_classes: int, in_channels: int, **args) -> nn.Module:
    """Construct a backbone by registered name or SOURCE:ARG, with an error listing the valid names."""
    return create_backbone(resolve_backbone(name), name, num_classes, in_channels, **args)
