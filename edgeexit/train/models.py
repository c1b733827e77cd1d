"""Exit-augmented models: a backbone split at cut points, an exit head after each, and model.pt I/O."""
from __future__ import annotations

import itertools
import os
import pickle
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeexit import __version__
from edgeexit.train.backbones import create_backbone, resolve_backbone
from edgeexit.train.config import ModelConfig
from edgeexit.train.cuts import CutGraph
from edgeexit.train.exits import build_exit
from edgeexit.train.macs import count_macs
from edgeexit.errors import InputError, first_line
from edgeexit.runtime.files import atomic_write

MODEL_FORMAT = "edgeexit-model"
MODEL_VERSION = 1


class EarlyExitModel(nn.Module):
    """Backbone segments with exit heads; `forward` returns every exit's outputs and the final logits.

    No cuts is a static network (`edgeexit pretrain`): one segment, the whole backbone, and no exit.

    The segments are fx graphs that share the backbone's modules, so `backbone` holds the
    single copy of its weights and its state_dict keys are the plain backbone's. They come in
    two sets, of the backbone's train-mode and eval-mode code (fx fixes `self.training` branches
    such as functional dropout when it traces), picked by the backbone's mode.
    """

    def __init__(self, config: ModelConfig, backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        channels = config.input_shape[0]
        if backbone is None:  # rebuilt from model.pt: the recorded source is checked (a pt2 file's hash, versions)
            resolved = resolve_backbone(config.backbone, config.backbone_source)
            backbone = create_backbone(resolved, config.backbone, config.num_classes, channels, **config.backbone_args)
        self.backbone = backbone
        self.cut_graph = CutGraph(self.backbone, config.input_shape)
        self.cut_graph.check_logits(config.num_classes)
        self._eval_segments = self.cut_graph.split(config.cuts)
        self._train_segments = self.cut_graph.split(config.cuts, training=True)
        self.cut_shapes = [self.cut_graph.resolve(name).shape for name in config.cuts]
        self.exits = nn.ModuleList(
            build_exit(config.exit_type, shape, config.num_classes, **config.exit_args) for shape in self.cut_shapes
        )
        if config.frozen_backbone:
            self.backbone.requires_grad_(False)

    @property
    def segments(self) -> list[nn.Module]:
        """The segments of the backbone's current mode (a frozen backbone's are its eval-mode code)."""
        return self._train_segments if self.backbone.training else self._eval_segments

    def train(self, mode: bool = True) -> "EarlyExitModel":
        """Train mode; a frozen backbone stays in eval so its BatchNorm statistics never change."""
        super().train(mode)
        if self.config.frozen_backbone:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[list[tuple[torch.Tensor, ...]], torch.Tensor]:
        exit_outputs = []
        segments = self.segments
        for segment, head in zip(segments[:-1], self.exits):
            x = segment(x)
            exit_outputs.append(head(x))
        return exit_outputs, segments[-1](x)

    def stage_macs(self) -> list[tuple[int, int]]:
        """(segment, exit head) MACs of each stage (the final stage's head is 0): the one cost walk behind
        exit_costs and the manifest's per-stage MACs."""
        in_shapes = [self.config.input_shape, *self.cut_shapes]
        heads = [*(count_macs(head, shape) for head, shape in zip(self.exits, self.cut_shapes)), 0]
        return [(count_macs(segment, shape), head) for segment, shape, head in zip(self._eval_segments, in_shapes, heads)]

    def exit_costs(self) -> list[float]:
        """Relative MACs of leaving at each exit (segments and heads passed so far), final = all."""
        full = self.cut_graph.full_macs
        return [running / full for running in itertools.accumulate(segment + head for segment, head in self.stage_macs())]


def checkpoint_dict(model: EarlyExitModel, extra: dict | None = None) -> dict:
    """The plain dict written as model.pt: format, version, config and tensors only."""
    return {
        "format": MODEL_FORMAT,
        "version": MODEL_VERSION,
        "edgeexit_version": __version__,
        "config": model.config.to_dict(),
        "state_dict": cpu_state_dict(model),
        "extra": extra or {},
    }


def cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's tensors on the CPU with the state_dict's `_metadata` kept: the per-module versions that a
    module's `_load_from_state_dict` may read (torchvision's MNASNet refuses weights without its version)."""
    state = module.state_dict()
    cpu = OrderedDict((key, value.detach().cpu()) for key, value in state.items())
    cpu._metadata = state._metadata  # type: ignore[attr-defined]  # torch.save and the weights-only loader keep it
    return cpu


def atomic_save(data: Any, path: str | os.PathLike) -> None:
    """torch.save through a temporary file and a rename: readers see the old file or the new one, never half of one."""
    atomic_write(path, lambda tmp: torch.save(data, tmp))


def save_model(model: EarlyExitModel, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Write model.pt atomically."""
    atomic_save(checkpoint_dict(model, extra), path)


def safe_load(path: Path, what: str) -> Any:
    """torch.load with the weights-only unpickler (tensors and plain data, no code); InputError naming `what` otherwise."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # the weights-only unpickler met code, a custom object or junk
        blocked = [line for line in str(exc).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        detail = blocked[0].strip() if blocked else "objects outside tensors and plain data"
        raise InputError(
            f"refusing to load {path}: the safe weights-only loader rejected it ({detail[:200]}); "
            f"it must be {what} (tensors and plain data, no code)"
        ) from None
    except Exception as exc:  # corrupt zips, truncated files and the like come in many types
        raise InputError(f"refusing to load {path}: not {what} ({first_line(exc)})") from None


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load model.pt safely (weights_only) and check its format; InputError on anything else."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"model file not found: {path}")
    data = safe_load(path, "a plain model.pt written by `edgeexit train`")
    if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT:
        raise InputError(f"{path} is not an edgeexit model.pt (missing format '{MODEL_FORMAT}')")
    if data.get("version") != MODEL_VERSION:
        raise InputError(f"{path} has model format version {data.get('version')}; this edgeexit reads {MODEL_VERSION}")
    if not isinstance(data.get("config"), dict) or not isinstance(data.get("state_dict"), dict):
        raise InputError(f"{path} lacks its config or state_dict")
    return data


def load_model(path: str | os.PathLike) -> EarlyExitModel:
    """Rebuild an EarlyExitModel from model.pt in eval mode."""
    data = read_checkpoint(path)
    model = EarlyExitModel(ModelConfig.from_dict(data["config"]))
    try:
        model.load_state_dict(data["state_dict"])
    except RuntimeError as exc:
        raise InputError(f"weights in {path} do not match the architecture: {first_line(exc)}") from None
    return model.eval()
