"""Training loop for exit-augmented models, with a progress bar and seeded, repeatable runs."""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from edgeexit.errors import ConfigError
from edgeexit.runtime.simulate import CascadeSimulator
from edgeexit.train.config import ModelConfig, TrainConfig
from edgeexit.train.cuts import CutGraph
from edgeexit.train.data import DataSplits
from edgeexit.train.losses import TAGGED_LOSSES, exit_tags, get_loss
from edgeexit.train.methods import get_method
from edgeexit.train.models import EarlyExitModel
from edgeexit.train.placement import place_exits


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch so a run is repeatable on the same machine."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class History:
    """Per-epoch training loss and validation metrics, and the epoch whose weights were kept.

    best_epoch (0-based index into the lists) is the epoch with the lowest validation loss
    among those trained with the main loss (warm-up epochs use another objective, so their
    losses are not comparable); model.pt holds that epoch's weights, as EENets keeps them.
    """

    loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    val_exit_rate: list[float] = field(default_factory=list)
    best_epoch: int = -1


class Indexed(Dataset):
    """A dataset whose items also carry their index, so per-example state (exit tags) can follow them."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        x, y = self.dataset[index]
        return x, y, index


def choose_cuts(
    backbone: torch.nn.Module, input_shape: Sequence[int], placement: str, num_exits: int, exit_at: Sequence[str] | None,
    placement_cost: str = "macs",
) -> list[str]:
    """Cut names: explicit `exit_at`, or picked by a placement scheme on the cumulative MACs or measured latency curve."""
    from edgeexit.train.cut_latency import check_placement_cost, cut_latencies, latency_candidates

    graph = CutGraph(backbone, input_shape)
    if exit_at:
        return [graph.resolve(name).name for name in exit_at]
    candidates = graph.candidates
    if check_placement_cost(placement_cost) == "latency":
        was_training = backbone.training  # exporting the prefixes puts the backbone in eval mode
        candidates = latency_candidates(candidates, *cut_latencies(graph))
        backbone.train(was_training)
    return [point.name for point in place_exits(placement, num_exits, candidates)]


@torch.no_grad()
def dataset_outputs(model: EarlyExitModel, dataset: Dataset, batch_size: int = 256):
    """Every exit's outputs, the final logits and the labels over `dataset`, in eval mode and in order."""
    model.eval()
    batches, finals, labels = [], [], []
    for x, y in DataLoader(dataset, batch_size=batch_size):
        exit_outputs, final = model(x)
        batches.append(exit_outputs)
        finals.append(final)
        labels.append(y)
    outputs = [tuple(torch.cat([b[k][i] for b in batches]) for i in range(len(batches[0][k]))) for k in range(len(model.exits))]
    return outputs, torch.cat(finals), torch.cat(labels)


def apply_loss(name: str, exit_outputs, final, labels, costs: Sequence[float], lam: float, tags=None) -> torch.Tensor:
    """The named loss; a loss in TAGGED_LOSSES gets `tags`, computed from these outputs when None."""
    if name not in TAGGED_LOSSES:
        return get_loss(name)(exit_outputs, final, labels, costs, lam)
    if tags is None:
        tags = exit_tags(exit_outputs, final, labels, costs, lam)
    return get_loss(name)(exit_outputs, final, labels, costs, lam, tags=tags)


@torch.no_grad()
def validate(model: EarlyExitModel, dataset: Dataset, loss_name: str, costs: Sequence[float], lam: float):
    """(loss, accuracy, early-exit rate) on `dataset`: the named loss, and the model's exit policy (model.config.policy).

    The exit decisions are the runtime's own numpy policies replayed on the PyTorch outputs
    (the calibration simulator), so any policy works and training-time numbers cannot
    disagree with `edgeexit run` about what a policy does.
    """
    outputs, final, labels = dataset_outputs(model, dataset)
    loss = float(apply_loss(loss_name, outputs, final, labels, costs, lam))
    policy = model.config.policy.build()
    arrays = [{role: t.numpy() for role, t in zip(head.outputs, out)} for head, out in zip(model.exits, outputs)]
    simulator = CascadeSimulator([policy] * len(arrays), arrays, final.numpy(), labels.numpy(), model.exit_costs())
    point = simulator.evaluate([policy.threshold] * len(arrays))
    return loss, point.accuracy, 1.0 - point.exit_counts[-1] / sum(point.exit_counts)


def param_groups(model: EarlyExitModel, config: TrainConfig) -> list[dict]:
    """Optimizer groups: the backbone at config.lr, the exit heads at config.head_lr (default: lr); trainable only."""
    head_ids = {id(p) for p in model.exits.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) not in head_ids], "lr": config.lr},
        {"params": [p for p in trainable if id(p) in head_ids], "lr": config.head_lr or config.lr},
    ]
    return [group for group in groups if group["params"]]


def train_model(
    model: EarlyExitModel, data: DataSplits, config: TrainConfig, progress: bool = True
) -> History:
    """Train the exits (and the backbone unless frozen) jointly with the configured loss.

    After each epoch the validation loss is measured; the weights of the main-loss epoch with
    the lowest one are restored at the end (History.best_epoch). Losses in TAGGED_LOSSES get
    per-example exit tags, recomputed at the start of each epoch from the model's outputs.
    """
    seed_everything(config.seed)
    get_loss(config.loss)  # unknown names fail before any training
    warmup_epochs = config.warmup_epochs if config.warmup_loss else 0
    costs = model.exit_costs()
    optimizer = torch.optim.AdamW(param_groups(model, config), weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(Indexed(data.train), batch_size=config.batch_size, shuffle=True, generator=generator,
                        num_workers=config.num_workers)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs * len(loader)))
    history = History()
    best_loss, best_state = float("inf"), None
    bar = tqdm(range(config.epochs), desc="train", unit="epoch", disable=not progress)
    for epoch in bar:
        warming = epoch < warmup_epochs
        loss_name = config.warmup_loss if warming else config.loss
        tags = None
        if loss_name in TAGGED_LOSSES:
            tags = exit_tags(*dataset_outputs(model, data.train), costs, config.lam)
        model.train()
        total, count = 0.0, 0
        for x, y, index in loader:
            exit_outputs, final = model(x)
            loss = apply_loss(loss_name, exit_outputs, final, y, costs, config.lam, None if tags is None else tags[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(y)
            count += len(y)
        val_loss, accuracy, exit_rate = validate(model, data.val, loss_name, costs, config.lam)
        history.loss.append(total / max(count, 1))
        history.val_loss.append(val_loss)
        history.val_accuracy.append(accuracy)
        history.val_exit_rate.append(exit_rate)
        if not warming and val_loss < best_loss:
            best_loss, best_state, history.best_epoch = val_loss, copy.deepcopy(model.state_dict()), epoch
        bar.set_postfix(loss=f"{history.loss[-1]:.3f}", val_loss=f"{val_loss:.3f}", val_acc=f"{accuracy:.3f}",
                        early=f"{exit_rate:.2f}")
    if best_state is not None:
        model.load_state_dict(best_state)
    else:  # warm-up only: the last epoch
        history.best_epoch = config.epochs - 1
    model.eval()
    return history


def build_model(
    data: DataSplits,
    backbone: str,
    exit_type: str,
    placement: str,
    num_exits: int,
    exit_at: Sequence[str] | None = None,
    method: str = "eenet",
    threshold: float | None = None,
    backbone_args: dict | None = None,
    exit_args: dict | None = None,
    weights: str | None = None,
    placement_cost: str = "macs",
) -> EarlyExitModel:
    """Construct an untrained exit-augmented model sized for `data`, its backbone loaded from `weights` if given."""
    from edgeexit.train.backbones import build_backbone
    from edgeexit.train.pretrained import load_backbone_weights

    spec = get_method(method)
    info = data.info
    net = build_backbone(backbone, info.num_classes, info.input_shape[0], **(backbone_args or {}))
    if weights:
        load_backbone_weights(net, weights, backbone)
    cuts = choose_cuts(net, info.input_shape, placement, num_exits, exit_at, placement_cost)
    config = ModelConfig(
        backbone=backbone,
        backbone_args=backbone_args or {},
        method=method,
        exit_type=exit_type,
        exit_args=exit_args or {},
        cuts=cuts,
        num_classes=info.num_classes,
        input_shape=info.input_shape,
        mean=info.mean,
        std=info.std,
        class_names=info.class_names,
        policy=spec.policy if threshold is None else spec.policy.with_threshold(threshold),
        frozen_backbone=spec.frozen_backbone,
    )
    model = EarlyExitModel(config, backbone=net)
    missing = set(config.policy.build().roles) - set(model.exits[0].outputs)
    if missing:
        raise ConfigError(f"exit type '{exit_type}' lacks the outputs {sorted(missing)} that method '{method}' needs")
    return model
