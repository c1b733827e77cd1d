"""Training loop for exit-augmented models, with a progress bar and seeded, repeatable runs."""
from __future__ import annotations

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
from edgeexit.train.losses import get_loss
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
    """Per-epoch training loss and validation metrics."""

    loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    val_exit_rate: list[float] = field(default_factory=list)


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
def evaluate(model: EarlyExitModel, dataset: Dataset, batch_size: int = 256) -> tuple[float, float]:
    """(accuracy, early-exit rate) of the model's exit policy (model.config.policy) on `dataset`.

    The exit decisions are the runtime's own numpy policies replayed on the PyTorch outputs
    (the calibration simulator), so any policy works and training-time numbers cannot
    disagree with `edgeexit run` about what a policy does.
    """
    model.eval()
    policy = model.config.policy.build()
    batches, finals, labels = [], [], []
    for x, y in DataLoader(dataset, batch_size=batch_size):
        exit_outputs, final = model(x)
        batches.append(exit_outputs)
        finals.append(final)
        labels.append(y)
    outputs = [
        {role: torch.cat([batch[k][i] for batch in batches]).numpy() for i, role in enumerate(head.outputs)}
        for k, head in enumerate(model.exits)
    ]
    policies = [policy] * len(model.exits)
    simulator = CascadeSimulator(policies, outputs, torch.cat(finals).numpy(), torch.cat(labels).numpy(), model.exit_costs())
    point = simulator.evaluate([policy.threshold] * len(policies))
    return point.accuracy, 1.0 - point.exit_counts[-1] / sum(point.exit_counts)


def train_model(
    model: EarlyExitModel, data: DataSplits, config: TrainConfig, progress: bool = True
) -> History:
    """Train the exits (and the backbone unless frozen) jointly with the configured loss."""
    seed_everything(config.seed)
    main_loss = get_loss(config.loss)
    warmup_loss = get_loss(config.warmup_loss) if config.warmup_loss else None
    costs = model.exit_costs()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(data.train, batch_size=config.batch_size, shuffle=True, generator=generator, num_workers=config.num_workers)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs * len(loader)))
    history = History()
    bar = tqdm(range(config.epochs), desc="train", unit="epoch", disable=not progress)
    for epoch in bar:
        loss_fn = warmup_loss if warmup_loss is not None and epoch < config.warmup_epochs else main_loss
        model.train()
        total, count = 0.0, 0
        for x, y in loader:
            exit_outputs, final = model(x)
            loss = loss_fn(exit_outputs, final, y, costs, config.lam)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(y)
            count += len(y)
        accuracy, exit_rate = evaluate(model, data.val)
        history.loss.append(total / max(count, 1))
        history.val_accuracy.append(accuracy)
        history.val_exit_rate.append(exit_rate)
        bar.set_postfix(loss=f"{history.loss[-1]:.3f}", val_acc=f"{accuracy:.3f}", early=f"{exit_rate:.2f}")
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
