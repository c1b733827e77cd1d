"""Where and how training runs: the torch device, the numeric precision, and torchrun's process group.

`training_env(device, precision)` is entered once per training run. Launched by torchrun
(WORLD_SIZE > 1 in the environment) it joins the process group, nccl on CUDA and gloo on
CPU, and each process takes `cuda:LOCAL_RANK`; launched plainly it is a world of one. The
trainer asks the resulting TrainEnv for its autocast context, gradient scaler, data loaders,
model wrapper and cross-rank sums, so it runs the same code in one process or many.
"""
from __future__ import annotations

import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from edgeexit.errors import ConfigError, DeviceError
from edgeexit.train.config import OPTIMIZERS, TrainSpec

DEVICE_HELP = "auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps"


@dataclass(frozen=True)
class Precision:
    """A --precision choice: the autocast dtype (None: plain float32) and whether gradients need scaling."""

    name: str
    autocast_dtype: torch.dtype | None
    scaled: bool


PRECISIONS = {
    "32": Precision("32", None, False),
    "bf16": Precision("bf16", torch.bfloat16, False),
    "16-mixed": Precision("16-mixed", torch.float16, True),
}


def get_precision(name: str) -> Precision:
    """The named precision, or ConfigError listing the valid names."""
    if name not in PRECISIONS:
        raise ConfigError(f"unknown precision '{name}'; choose from: {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def resolve_device(spec: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """The torch device for a --device value; DeviceError when it is unknown or not present here.

    Under torchrun every process on a machine says the same `--device`, so `cuda` and `auto`
    mean this process's own GPU, cuda:LOCAL_RANK.
    """
    name = spec.strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError("--device mps: no Apple MPS device is available here; use --device cpu")
        if world_size > 1:
            raise DeviceError("--device mps cannot train with several processes (torch has no mps process group)")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {spec}: no CUDA device is available here; use --device cpu (or auto)")
        if name == "cuda":
            index = local_rank
        else:
            if world_size > 1:
                raise DeviceError(f"--device {spec}: under torchrun use --device cuda (each process takes cuda:LOCAL_RANK)")
            suffix = name[len("cuda:"):]
            if not suffix.isdigit():
                raise DeviceError(f"--device {spec}: expected cuda:N with a GPU number N")
            index = int(suffix)
        count = torch.cuda.device_count()
        if index >= count:
            raise DeviceError(f"--device {spec}: GPU {index} is not present (this machine has {count})")
        return torch.device("cuda", index)
    raise DeviceError(f"unknown device '{spec}'; choose from: {DEVICE_HELP}")


def check_precision(precision: Precision, device: torch.device) -> None:
    """Refuse precisions the device cannot train in, before any work is done."""
    if precision.name == "16-mixed" and device.type == "cpu":
        raise ConfigError("--precision 16-mixed needs a GPU; on CPU use --precision bf16 (or 32)")
    if precision.name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; use 16-mixed")


@dataclass(frozen=True)
class TrainEnv:
    """One training process: its device, precision, rank and world size (1 when not under torchrun)."""

    device: torch.device
    precision: Precision
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints progress and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> Any:
        """The forward-pass autocast context of this precision (a no-op for 32)."""
        dtype = self.precision.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler, enabled only for float16 (bf16 has float32's range and needs none)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision.scaled)

    def train_loader(self, dataset: Dataset, batch_size: int, seed: int, workers: int = 0) -> DataLoader:
        """Shuffled batches of this rank's share of `dataset`; call `begin_epoch` before each epoch.

        One process shuffles with a generator seeded by `seed` (its state is the data order a
        checkpoint saves). Under torchrun a DistributedSampler shuffles by (seed, epoch), the
        same on every rank, each rank taking its share. `batch_size` is per process.
        """
        pin = self.device.type == "cuda"
        if self.distributed:
            sampler = DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=seed)
            return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin,
                              persistent_workers=workers > 0)
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, num_workers=workers,
                          pin_memory=pin, persistent_workers=workers > 0)

    @staticmethod
    def begin_epoch(loader: DataLoader, epoch: int) -> None:
        """Tell a DistributedSampler which epoch it shuffles for (a single process's generator moves on by itself)."""
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)

    def shard(self, dataset: Dataset) -> Dataset:
        """This rank's strided share of an evaluation set: every example once across ranks, none padded."""
        if not self.distributed:
            return dataset
        return Subset(dataset, list(range(self.rank, len(dataset), self.world_size)))

    def wrap(self, model: nn.Module, frozen: Sequence[str] = ()) -> nn.Module:
        """The model for the training forward pass: DistributedDataParallel when distributed, else itself.

        `frozen` names a submodule (PTEENet's backbone) whose parameters and buffers DDP leaves
        alone: no gradient buckets, no buffer broadcasts.
        """
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ignored = [name for name, _ in model.named_parameters() if name.split(".")[0] in frozen]
        ignored += [name for name, _ in model.named_buffers() if name.split(".")[0] in frozen]
        if ignored:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # warm-up losses leave the confidence heads out of the graph, so some parameters get no gradient
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums of `values` over all ranks (the values themselves in one process)."""
        if not self.distributed:
            return list(values)
        reduce_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        tensor = torch.tensor(list(values), dtype=torch.float64, device=reduce_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def weighted_mean(self, values: Sequence[float], weight: float) -> list[float]:
        """Means of per-rank `values` weighted by each rank's `weight` (its example count)."""
        *sums, total = self.sum([v * weight for v in values] + [weight])
        return [s / max(total, 1e-12) for s in sums]


def _launcher_ranks() -> tuple[int, int, int]:
    """(rank, local rank, world size) that torchrun put in the environment; (0, 0, 1) otherwise."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError as exc:
        raise ConfigError(f"RANK/LOCAL_RANK/WORLD_SIZE must be integers (as torchrun sets them): {exc}") from None


@contextmanager
def training_env(device: str = "auto", precision: str = "32") -> Iterator[TrainEnv]:
    """Resolve device and precision, join torchrun's process group when launched by it, and leave it after."""
    chosen = get_precision(precision)
    rank, local_rank, world_size = _launcher_ranks()
    target = resolve_device(device, local_rank, world_size)
    check_precision(chosen, target)
    joined = False
    if world_size > 1 and not dist.is_initialized():
        if target.type == "cuda":
            torch.cuda.set_device(target)
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo", rank=rank, world_size=world_size)
        joined = True
    try:
        yield TrainEnv(target, chosen, rank, world_size)
        if joined:
            # leave together: a rank that tore gloo down while rank 0 still wrote model.pt aborted at exit
            # ("terminate called without an active exception") in 2 of 33 two-process CPU runs; 0 of 50 with the barrier
            dist.barrier()
    finally:
        if joined:
            dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch so a run is repeatable on the same machine."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Backward pass (loss scaled when the scaler is enabled), optimizer and scheduler steps."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()


def make_optimizer(params, spec: TrainSpec) -> torch.optim.Optimizer:
    """The spec's OPTIMIZERS entry over `params` (a module's parameters or param groups), at its learning rate."""
    choice = OPTIMIZERS.get(spec.optimizer)
    return getattr(torch.optim, choice.torch_class)(params, lr=spec.learning_rate, weight_decay=spec.weight_decay,
                                                    **choice.settings)
