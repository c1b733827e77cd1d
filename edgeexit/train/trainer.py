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
from edgeexit.train.checkpoints import Checkpoint, capture_rng, checkpoint_path, load_checkpoint, restore_rng, save_checkpoint
from edgeexit.train.config import ModelConfig, TrainConfig
from edgeexit.train.cuts import CutGraph
from edgeexit.train.data import DataSplits
from edgeexit.train.hardware import TrainEnv, get_precision
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
def evaluate(
    model: EarlyExitModel, dataset: Dataset, batch_size: int = 256, device: torch.device | None = None
) -> tuple[float, float]:
    """(accuracy, early-exit rate) of the model's exit policy (model.config.policy) on `dataset`.

    The exit decisions are the runtime's own numpy policies replayed on the PyTorch outputs
    (the calibration simulator), so any policy works and training-time numbers cannot
    disagree with `edgeexit run` about what a policy does. Runs in float32, as the exported
    graphs do, on `device` (default: where the model is).
    """
    model.eval()
    device = device or next(model.parameters()).device
    policies = [model.config.exit_policy(k).build() for k in range(len(model.exits))]
    batches, finals, labels = [], [], []
    for x, y in DataLoader(dataset, batch_size=batch_size):
        exit_outputs, final = model(x.to(device))
        batches.append([tuple(t.float().cpu() for t in outputs) for outputs in exit_outputs])
        finals.append(final.float().cpu())
        labels.append(y)
    outputs = [
        {role: torch.cat([batch[k][i] for batch in batches]).numpy() for i, role in enumerate(head.outputs)}
        for k, head in enumerate(model.exits)
    ]
    simulator = CascadeSimulator(policies, outputs, torch.cat(finals).numpy(), torch.cat(labels).numpy(), model.exit_costs())
    point = simulator.evaluate([policy.threshold for policy in policies])
    return point.accuracy, 1.0 - point.exit_counts[-1] / sum(point.exit_counts)


def sharded_evaluate(model: EarlyExitModel, dataset: Dataset, env: TrainEnv) -> tuple[float, float]:
    """`evaluate` on this rank's share of `dataset`, averaged over all ranks (the same numbers on every rank)."""
    shard = env.shard(dataset)
    values = evaluate(model, shard, device=env.device) if len(shard) else (0.0, 0.0)
    accuracy, exit_rate = env.weighted_mean(values, len(shard))
    return accuracy, exit_rate


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Backward pass (loss scaled when the scaler is enabled), optimizer and scheduler steps."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()


# TrainConfig fields a resumed run may change: they do not alter what is computed
RESUME_FREE = ("device", "num_workers", "checkpoint_dir", "resume", "data_dir", "download")


def resume_settings(config: TrainConfig, env: TrainEnv) -> dict:
    """The settings a checkpoint must have been written with for this run to continue it exactly."""
    settings = {k: v for k, v in vars(config).items() if k not in RESUME_FREE}
    return {**settings, "world_size": env.world_size}


def train_model(
    model: EarlyExitModel, data: DataSplits, config: TrainConfig, progress: bool = True, env: TrainEnv | None = None
) -> History:
    """Train the exits (and the backbone unless frozen) jointly with the configured loss.

    `env` says where (device, precision, rank among torchrun's processes; default: one
    float32 CPU process). With config.checkpoint_dir every epoch ends in a checkpoint, and
    config.resume continues from the one there. The model ends in eval mode on the CPU.
    """
    env = env or TrainEnv(torch.device("cpu"), get_precision("32"))
    seed_everything(config.seed)
    main_loss = get_loss(config.loss)
    warmup_loss = get_loss(config.warmup_loss) if config.warmup_loss else None
    costs = model.exit_costs()
    model.to(env.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    loader = env.train_loader(data.train, config.batch_size, config.seed, config.num_workers)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs * len(loader)))
    scaler = env.grad_scaler()
    history = History()
    run = resume_settings(config, env)
    resumed = None
    if config.checkpoint_dir and config.resume:
        resumed = load_checkpoint(config.checkpoint_dir, model.config.to_dict(), run)
    if resumed is not None:
        model.load_state_dict(resumed.model)
        optimizer.load_state_dict(resumed.optimizer)
        scheduler.load_state_dict(resumed.scheduler)
        scaler.load_state_dict(resumed.scaler)
        history = History(**resumed.history)
        restore_rng(resumed.rng, env.device, loader.generator)
    start = resumed.epoch if resumed is not None else 0
    net = env.wrap(model, frozen=("backbone",) if model.config.frozen_backbone else ())
    show = progress and env.is_main
    if show and resumed is not None:
        tqdm.write(f"resuming from {checkpoint_path(config.checkpoint_dir)} after epoch {start}")
    bar = tqdm(range(start, config.epochs), initial=start, total=config.epochs, desc="train", unit="epoch", disable=not show)
    for epoch in bar:
        loss_fn = warmup_loss if warmup_loss is not None and epoch < config.warmup_epochs else main_loss
        env.begin_epoch(loader, epoch)
        net.train()
        total, count = torch.zeros((), device=env.device), 0
        for x, y in loader:
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            with env.autocast():
                exit_outputs, final = net(x)
                loss = loss_fn(exit_outputs, final, y, costs, config.lam)
            optimizer_step(loss, optimizer, scaler, scheduler)
            total += loss.detach().float() * len(y)
            count += len(y)
        total, count = env.sum([float(total), count])
        accuracy, exit_rate = sharded_evaluate(model, data.val, env)
        history.loss.append(total / max(count, 1))
        history.val_accuracy.append(accuracy)
        history.val_exit_rate.append(exit_rate)
        bar.set_postfix(loss=f"{history.loss[-1]:.3f}", val_acc=f"{accuracy:.3f}", early=f"{exit_rate:.2f}")
        if config.checkpoint_dir and env.is_main:
            save_checkpoint(config.checkpoint_dir, Checkpoint(
                model_config=model.config.to_dict(), run=run, epoch=epoch + 1, model=model.state_dict(),
                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                rng=capture_rng(env.device, loader.generator), history=vars(history),
            ))
    model.eval().cpu()
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
    policy_args: dict | None = None,
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
        policy=(spec.policy if threshold is None else spec.policy.with_threshold(threshold)).with_args(policy_args),
        frozen_backbone=spec.frozen_backbone,
    )
    model = EarlyExitModel(config, backbone=net)
    built = [config.exit_policy(k).build() for k in range(len(cuts))]  # bad args (e.g. --beta on confidence) fail here
    missing = set(built[0].roles) - set(model.exits[0].outputs)
    if missing:
        raise ConfigError(f"exit type '{exit_type}' lacks the outputs {sorted(missing)} that method '{method}' needs")
    return model
