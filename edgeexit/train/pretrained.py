"""Pre-trained backbone weights: load a user's local weights file into a backbone, or train a plain one.

PTEENet starts from a model someone already trained. Its weights come only from a local
file (never a hub download): a state_dict, or a checkpoint dict holding one under
'state_dict' or 'model' (torchvision's reference scripts), 'module.' prefixes stripped.
`pretrain_backbone` trains the plain backbone with cross-entropy and writes such a file,
so tests and the digits demo have a real pre-trained model to post-train.
"""
from __future__ import annotations

import argparse
import copy
import os
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from edgeexit.train.backbones import create_backbone, first_conv_name, resolve_backbone
from edgeexit.train.data import training_splits
from edgeexit.errors import EdgeExitError, InputError, first_line
from edgeexit.extras import require
from edgeexit.train.config import PRETRAIN, TrainSpec
from edgeexit.train.hardware import TrainEnv, make_optimizer, optimizer_step, seed_everything, training_env
from edgeexit.train.config import ModelConfig
from edgeexit.train.models import MODEL_FORMAT, EarlyExitModel, atomic_save, cpu_state_dict, save_model

CHECKPOINT_KEYS = ("state_dict", "model")
STATIC_METHOD = "static"  # model.pt's method for a network with no exits (`edgeexit pretrain`)
SHOWN = 3  # keys named per problem in an error line


def _read_file(path: Path) -> Any:
    """A weights file's content: .safetensors through safetensors, else torch.load with the weights-only unpickler.

    argparse.Namespace is allowed: timm's and torchvision's training scripts store their
    arguments in their checkpoints as one (plain values only).
    """
    if path.suffix == ".safetensors":
        safetensors = require("safetensors.torch", "reading .safetensors weights", "pip install safetensors")
        return safetensors.load_file(str(path), device="cpu")
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (.pth, .pt, .safetensors; plain tensors only), wrapper prefixes stripped;
    of an edgeexit model.pt (`pretrain`, `train`), its backbone's tensors.

    A state_dict, or a training checkpoint holding one under 'state_dict' (timm's train.py) or
    'model' (torchvision's reference scripts); 'module.' (DataParallel) and '_orig_mod.'
    (torch.compile) prefixes are removed.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights file not found: {path}")
    try:
        data = _read_file(path)
    except EdgeExitError:
        raise
    except Exception as exc:  # unpickling and safetensors errors come in many types
        raise InputError(f"cannot read weights {path}: not a plain tensor file ({first_line(exc)})") from None
    if isinstance(data, dict) and data.get("format") == MODEL_FORMAT and isinstance(data.get("state_dict"), dict):
        data = {k.removeprefix("backbone."): v for k, v in data["state_dict"].items() if k.startswith("backbone.")}
    elif isinstance(data, dict):
        data = next((data[k] for k in CHECKPOINT_KEYS if isinstance(data.get(k), dict)), data)
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise InputError(f"{path} holds no state_dict (a dict of tensors, or a checkpoint with 'state_dict' or 'model')")
    return {key.removeprefix("module.").removeprefix("_orig_mod."): value for key, value in data.items()}


def _adapt_stem(net: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """RGB stem kernels summed for a 1-channel stem: conv(gray repeated 3x) == conv_summed(gray)."""
    stem = first_conv_name(net)
    key = f"{stem}.weight"
    if stem is None or key not in state:
        return state
    have, want = state[key].shape, net.get_submodule(stem).weight.shape
    if len(have) == 4 and have[1] == 3 and want[1] == 1 and (have[0], *have[2:]) == (want[0], *want[2:]):
        state = {**state, key: state[key].sum(1, keepdim=True)}
    return state


def _few(keys: list[str]) -> str:
    more = f" (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def load_backbone_weights(net: nn.Module, path: str | os.PathLike, name: str = "the backbone") -> None:
    """Load a weights file into `net` strictly; InputError naming missing, unexpected and mis-shaped keys."""
    state = _adapt_stem(net, read_state_dict(path))
    expected = net.state_dict()
    # checkpoints older than BatchNorm's num_batches_tracked lack it; it never affects outputs
    state.update({k: v for k, v in expected.items() if k.endswith("num_batches_tracked") and k not in state})
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    problems = [f"{label} {_few(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape (file vs model)", shapes)) if keys]
    if problems:
        raise InputError(f"weights in {path} do not match {name}: {'; '.join(problems)}")
    # per-module versions (state_dict `_metadata`) rarely survive a weights file (.safetensors has none, the prefix
    # clean-up above drops them); the module's own are assumed: the key and shape checks above hold them to it
    versioned = OrderedDict(state)
    versioned._metadata = expected._metadata  # type: ignore[attr-defined]
    net.load_state_dict(versioned)


def save_state_dict(net: nn.Module, path: str | os.PathLike) -> None:
    """Write the plain state_dict (with its per-module versions) atomically."""
    atomic_save(cpu_state_dict(net), path)


@torch.no_grad()
def accuracy(net: nn.Module, dataset: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy of a plain classifier in eval mode, on the device its weights are on."""
    net.eval()
    device = next(net.parameters()).device
    correct = total = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        correct += int((net(x.to(device)).argmax(1).cpu() == y).sum())
        total += len(y)
    return correct / max(total, 1)


def fit_backbone(net: nn.Module, train: Dataset, env: TrainEnv, spec: TrainSpec = PRETRAIN, progress: bool = True) -> nn.Module:
    """Train a plain backbone (already on env.device) in place: cross-entropy (label-smoothed as the spec says),
    the spec's optimizer (pretraining's default: SGD, Nesterov) and a one-cycle schedule."""
    optimizer = make_optimizer(net.parameters(), spec)
    loader = env.train_loader(train, spec.batch_size, spec.seed, spec.num_workers)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=spec.learning_rate, total_steps=spec.epochs * len(loader))
    scaler = env.grad_scaler()
    wrapped = env.wrap(net)
    for epoch in tqdm(range(spec.epochs), desc="pretrain", unit="epoch", disable=not (progress and env.is_main)):
        env.begin_epoch(loader, epoch)
        wrapped.train()
        for x, y in loader:
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            with env.autocast():
                loss = F.cross_entropy(wrapped(x), y, label_smoothing=spec.label_smoothing)
            optimizer_step(loss, optimizer, scaler, scheduler)
    return net.eval()


def pretrain_backbone(spec: TrainSpec, out: str | os.PathLike, progress: bool = True) -> dict[str, Any]:
    """Train the plain backbone spec.backbone (cross-entropy, one-cycle) and write it to `out` as a model.pt with no
    exits: `export` makes it a one-stage bundle (or a stage of a model cascade), `train --weights` reads its backbone.

    Data, augmentation, optimizer, device, precision and torchrun launches work as in `edgeexit
    train`; rank 0 writes `out`. The summary holds the resolved spec (what `pretrain` prints).
    """
    spec.check()
    with training_env(spec.device, spec.precision) as env:
        seed_everything(spec.seed)
        splits, spec = training_splits(spec)
        spec = replace(spec.with_optimizer(len(splits.train)), head_lr=None)  # model.pt records the lr that ran; no heads
        info = splits.info
        resolved = resolve_backbone(spec.backbone)
        net = create_backbone(resolved, spec.backbone, info.num_classes, info.input_shape[0], **spec.backbone_args)
        fit_backbone(net.to(env.device), splits.training_set(), env, spec, progress)
        if env.is_main:
            config = ModelConfig(backbone=spec.backbone, backbone_args=spec.backbone_args, backbone_source=resolved.source,
                                 method=STATIC_METHOD, cuts=[], num_classes=info.num_classes, input_shape=info.input_shape,
                                 mean=info.mean, std=info.std, class_names=info.class_names)
            save_model(EarlyExitModel(config, backbone=copy.deepcopy(net).cpu().eval()), out, {"train": spec.to_dict()})
        summary = {"val_accuracy": accuracy(net, splits.val), "test_accuracy": accuracy(net, splits.test)}
    return {**summary, "input_shape": info.input_shape, "rank": env.rank, "spec": spec}
