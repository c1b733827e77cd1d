"""Pre-trained backbone weights: load a user's local weights file into a backbone, or train a plain one.

PTEENet starts from a model someone already trained. Its weights come only from a local
file (never a hub download): a state_dict, or a checkpoint dict holding one under
'state_dict' or 'model' (torchvision's reference scripts), 'module.' prefixes stripped.
`pretrain_backbone` trains the plain backbone with cross-entropy and writes such a file,
so tests and the digits demo have a real pre-trained model to post-train.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from edgeexit.train.backbones import build_backbone, first_conv_name
from edgeexit.train.data import load_data
from edgeexit.errors import ConfigError, InputError, first_line
from edgeexit.train.config import TrainConfig
from edgeexit.train.hardware import TrainEnv, optimizer_step, seed_everything, training_env
from edgeexit.train.models import atomic_save

CHECKPOINT_KEYS = ("state_dict", "model")
SHOWN = 3  # keys named per problem in an error line


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (plain tensors only, weights_only), 'module.' prefixes stripped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise InputError(f"cannot read weights {path}: not a plain tensor file ({first_line(exc)})") from None
    if isinstance(data, dict):
        data = next((data[k] for k in CHECKPOINT_KEYS if isinstance(data.get(k), dict)), data)
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise InputError(f"{path} holds no state_dict (a dict of tensors, or a checkpoint with 'state_dict' or 'model')")
    return {key.removeprefix("module."): value for key, value in data.items()}


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
    net.load_state_dict(state)


def save_state_dict(net: nn.Module, path: str | os.PathLike) -> None:
    """Write the plain state_dict atomically."""
    atomic_save({k: v.detach().cpu() for k, v in net.state_dict().items()}, path)


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


def fit_backbone(net: nn.Module, train: Dataset, env: TrainEnv, epochs: int, batch_size: int = 64, lr: float = 0.05,
                 seed: int = 0, progress: bool = True, num_workers: int = 0) -> nn.Module:
    """Train a plain backbone (already on env.device) in place with cross-entropy, SGD (Nesterov) and a one-cycle schedule."""

    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    loader = env.train_loader(train, batch_size, seed, num_workers)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * len(loader))
    scaler = env.grad_scaler()
    wrapped = env.wrap(net)
    for epoch in tqdm(range(epochs), desc="pretrain", unit="epoch", disable=not (progress and env.is_main)):
        env.begin_epoch(loader, epoch)
        wrapped.train()
        for x, y in loader:
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            with env.autocast():
                loss = F.cross_entropy(wrapped(x), y)
            optimizer_step(loss, optimizer, scaler, scheduler)
    return net.eval()


def pretrain_backbone(
    backbone: str,
    out: str | os.PathLike,
    data: str = "digits",
    data_dir: str | None = None,
    download: bool = False,
    input_size: int | None = None,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 0.05,
    seed: int = 0,
    progress: bool = True,
    device: str = TrainConfig.device,
    precision: str = TrainConfig.precision,
    num_workers: int = TrainConfig.num_workers,
) -> dict[str, Any]:
    """Train the plain backbone (cross-entropy, SGD + one-cycle) and write its state_dict to `out`.

    Device, precision and torchrun launches work as in `edgeexit train`; rank 0 writes `out`.
    """

    if epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs}")
    if num_workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {num_workers}")
    with training_env(device, precision) as env:
        seed_everything(seed)
        splits = load_data(data, data_dir=data_dir, download=download, input_size=input_size)
        info = splits.info
        net = build_backbone(backbone, info.num_classes, info.input_shape[0]).to(env.device)
        fit_backbone(net, splits.train, env, epochs, batch_size, lr, seed, progress, num_workers)
        if env.is_main:
            save_state_dict(net, out)
        summary = {"val_accuracy": accuracy(net, splits.val), "test_accuracy": accuracy(net, splits.test)}
    return {**summary, "input_shape": info.input_shape, "rank": env.rank}
