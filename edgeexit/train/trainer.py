"""Training loop for exit-augmented models, with a progress bar and seeded, repeatable runs."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from edgeexit.runtime.simulate import CascadeSimulator
from edgeexit.train.checkpoints import Checkpoint, capture_rng, checkpoint_path, load_checkpoint, restore_rng, save_checkpoint
from edgeexit.train.config import TrainSpec, parse_distill
from edgeexit.errors import ConfigError
from edgeexit.train.data import DataSplits
from edgeexit.train.hardware import TrainEnv, get_precision, make_optimizer, optimizer_step, seed_everything
from edgeexit.train.losses import TAGGED_LOSSES, distillation, exit_tags, get_loss
from edgeexit.train.models import EarlyExitModel


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


@torch.no_grad()
def dataset_outputs(model: EarlyExitModel, dataset: Dataset, batch_size: int = 256, device: torch.device | None = None):
    """Every exit's outputs, the final logits and the labels over `dataset`, in eval mode and in order.

    Runs in float32, as the exported graphs do, on `device` (default: where the model is);
    the outputs come back on the CPU.
    """
    model.eval()
    device = device or next(model.parameters()).device
    batches, finals, labels = [], [], []
    for x, y in DataLoader(dataset, batch_size=batch_size):
        exit_outputs, final = model(x.to(device))
        batches.append([tuple(t.float().cpu() for t in outputs) for outputs in exit_outputs])
        finals.append(final.float().cpu())
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


# Losses whose classifier terms are each a plain cross-entropy against the labels, and which classifiers those are:
# label smoothing applies to exactly those terms. The EENets mixtures (v1, v2) and PTEENet's losses (against the
# backbone's predictions) have none, so --label-smoothing refuses them.
SMOOTHED_CLASSIFIERS = {"v0": "all", "v4": "all", "final": "final", "exclusion": "final"}


def check_smoothing(loss_names: Sequence[str | None], smoothing: float) -> None:
    """ConfigError when label smoothing is asked for with a loss it cannot apply to."""
    refused = [name for name in loss_names if name and name not in SMOOTHED_CLASSIFIERS]
    if smoothing and refused:
        raise ConfigError(f"--label-smoothing applies to losses {', '.join(SMOOTHED_CLASSIFIERS)}; this run trains with "
                          f"{refused[0]} (its terms are not one classifier's cross-entropy against the labels)")


def smoothing_term(name: str, exit_outputs, final, labels, roles: Sequence[Sequence[str]], smoothing: float) -> torch.Tensor:
    """What turns each classifier's CE(p, y) in loss `name` into the label-smoothed (1 - e) CE(p, y) + e CE(p, uniform)."""
    logits = [final]
    if SMOOTHED_CLASSIFIERS[name] == "all":
        logits += [outputs[list(names).index("logits")] for outputs, names in zip(exit_outputs, roles)]
    return smoothing * sum(-F.log_softmax(l.float(), dim=1).mean(1).mean() - F.cross_entropy(l.float(), labels) for l in logits)


def epoch_loss(spec: TrainSpec, epoch: int) -> tuple[str, bool]:
    """(loss name, main) of an epoch: the mixed schedule's backbone epochs (loss "final"), then the warm-up loss's,
    then the main loss's; only main epochs compete for the kept weights."""
    backbone = spec.backbone_epochs
    if epoch < backbone:
        return "final", False
    if spec.warmup_loss and epoch < backbone + spec.warmup_epochs:
        return spec.warmup_loss, False
    return spec.loss, True


@torch.no_grad()
def validate(model: EarlyExitModel, dataset: Dataset, loss_name: str, costs: Sequence[float], lam: float,
             device: torch.device | None = None):
    """(loss, accuracy, early-exit rate) on `dataset`: the named loss, and the model's exit policies (per exit).

    The exit decisions are the runtime's own numpy policies replayed on the PyTorch outputs
    (the calibration simulator), so any policy works and training-time numbers cannot
    disagree with `edgeexit run` about what a policy does.
    """
    outputs, final, labels = dataset_outputs(model, dataset, device=device)
    loss = float(apply_loss(loss_name, outputs, final, labels, costs, lam))
    policies = [model.config.exit_policy(k).build() for k in range(len(model.exits))]
    arrays = [{role: t.numpy() for role, t in zip(head.outputs, out)} for head, out in zip(model.exits, outputs)]
    simulator = CascadeSimulator(policies, arrays, final.numpy(), labels.numpy(), model.exit_costs())
    point = simulator.evaluate([policy.threshold for policy in policies])
    return loss, point.accuracy, 1.0 - point.exit_counts[-1] / sum(point.exit_counts)


def param_groups(model: EarlyExitModel, spec: TrainSpec) -> list[dict]:
    """Optimizer groups: the backbone at the learning rate, the exit heads at spec.head_lr (default: the same); trainable only."""
    head_ids = {id(p) for p in model.exits.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) not in head_ids], "lr": spec.learning_rate},
        {"params": [p for p in trainable if id(p) in head_ids], "lr": spec.head_lr or spec.learning_rate},
    ]
    return [group for group in groups if group["params"]]


def sharded_validate(model: EarlyExitModel, dataset: Dataset, loss_name: str, costs: Sequence[float], lam: float,
                     env: TrainEnv) -> list[float]:
    """`validate` on this rank's share of `dataset`, averaged over all ranks (the same numbers on every rank)."""
    shard = env.shard(dataset)
    values = validate(model, shard, loss_name, costs, lam, device=env.device) if len(shard) else (0.0, 0.0, 0.0)
    return env.weighted_mean(values, len(shard))


# TrainSpec fields a resumed run may change: they do not alter what is computed
RESUME_FREE = ("device", "num_workers", "checkpoint_dir", "resume", "data_dir", "download")


def resume_settings(config: TrainSpec, env: TrainEnv) -> dict:
    """The settings a checkpoint must have been written with for this run to continue it exactly."""
    settings = {k: v for k, v in vars(config).items() if k not in RESUME_FREE}
    return {**settings, "world_size": env.world_size}


def train_model(
    model: EarlyExitModel, data: DataSplits, config: TrainSpec, progress: bool = True, env: TrainEnv | None = None
) -> History:
    """Train the exits (and the backbone unless frozen) with the configured loss, optimizer and schedule.

    The mixed schedule first trains the backbone and final classifier alone (config.backbone_epochs),
    then everything jointly; the optimizer reads the training split through its augmentation
    (data.training_set()), validation never does. After each epoch the validation loss is measured; the weights of the main-loss epoch with
    the lowest one are restored at the end (History.best_epoch). Losses in TAGGED_LOSSES get
    per-example exit tags, recomputed at the start of each epoch from the model's outputs.
    `env` says where (device, precision, rank among torchrun's processes; default: one
    float32 CPU process). With config.checkpoint_dir every epoch ends in a checkpoint (the
    best-so-far weights in its `best` slot), and config.resume continues from the one there.
    The model ends in eval mode on the CPU. An optimizer left open (None) is chosen by the training split's
    size (TrainSpec.with_optimizer), as `edgeexit train` does.
    """
    config = config.with_optimizer(len(data.train))
    env = env or TrainEnv(torch.device("cpu"), get_precision("32"))
    seed_everything(config.seed)
    get_loss(config.loss)  # unknown names fail before any training
    check_smoothing([config.loss, config.warmup_loss, "final" if config.backbone_epochs else None], config.label_smoothing)
    distill = parse_distill(config.distill)
    costs = model.exit_costs()
    roles = [head.outputs for head in model.exits]
    model.to(env.device)
    optimizer = make_optimizer(param_groups(model, config), config)
    loader = env.train_loader(Indexed(data.training_set()), config.batch_size, config.seed, config.num_workers)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs * len(loader)))
    scaler = env.grad_scaler()
    history = History()
    best_loss, best_state = float("inf"), None
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
        if resumed.best:
            best_loss, best_state = resumed.best["loss"], resumed.best["model"]
    start = resumed.epoch if resumed is not None else 0
    net = env.wrap(model, frozen=("backbone",) if model.config.frozen_backbone else ())
    show = progress and env.is_main
    if show and resumed is not None:
        tqdm.write(f"resuming from {checkpoint_path(config.checkpoint_dir)} after epoch {start}")
    bar = tqdm(range(start, config.epochs), initial=start, total=config.epochs, desc="train", unit="epoch", disable=not show)
    for epoch in bar:
        loss_name, main = epoch_loss(config, epoch)
        tags = None
        if loss_name in TAGGED_LOSSES:
            tags = exit_tags(*dataset_outputs(model, data.train, device=env.device), costs, config.lam)
        env.begin_epoch(loader, epoch)
        net.train()
        total, count = torch.zeros((), device=env.device), 0
        for x, y, index in loader:
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            batch_tags = None if tags is None else tags[index].to(env.device)
            with env.autocast():
                exit_outputs, final = net(x)
                loss = apply_loss(loss_name, exit_outputs, final, y, costs, config.lam, batch_tags)
                if config.label_smoothing:
                    loss = loss + smoothing_term(loss_name, exit_outputs, final, y, roles, config.label_smoothing)
                if distill and loss_name != "final":  # not in the mixed schedule's backbone epochs: no exits trained
                    loss = loss + distillation(exit_outputs, final, *distill)
            optimizer_step(loss, optimizer, scaler, scheduler)
            total += loss.detach().float() * len(y)
            count += len(y)
        total, count = env.sum([float(total), count])
        val_loss, accuracy, exit_rate = sharded_validate(model, data.val, loss_name, costs, config.lam, env)
        history.loss.append(total / max(count, 1))
        history.val_loss.append(val_loss)
        history.val_accuracy.append(accuracy)
        history.val_exit_rate.append(exit_rate)
        if main and val_loss < best_loss:
            best_loss, best_state, history.best_epoch = val_loss, copy.deepcopy(model.state_dict()), epoch
        bar.set_postfix(loss=f"{history.loss[-1]:.3f}", val_loss=f"{val_loss:.3f}", val_acc=f"{accuracy:.3f}",
                        early=f"{exit_rate:.2f}")
        if config.checkpoint_dir and env.is_main:
            best = {} if best_state is None else {"loss": best_loss, "model": best_state}
            save_checkpoint(config.checkpoint_dir, Checkpoint(
                model_config=model.config.to_dict(), run=run, epoch=epoch + 1, model=model.state_dict(),
                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                rng=capture_rng(env.device, loader.generator), history=vars(history), best=best,
            ))
    if best_state is not None:
        model.load_state_dict(best_state)
    else:  # no main-loss epoch: the last epoch
        history.best_epoch = config.epochs - 1
    model.eval().cpu()
    return history
