"""Training checkpoints: everything a stopped run needs to continue as if it had never stopped.

`--checkpoint-dir DIR` keeps one file, DIR/checkpoint.pt, replaced atomically after every
epoch: model, optimizer, scheduler and gradient-scaler states, the number of finished
epochs, the history and best-so-far state, and the python/numpy/torch(/cuda) RNG states
with the data-order generator's (under torchrun the order is a function of the seed and
the epoch: TrainEnv.train_loader). The file holds tensors and plain data only and is read with the
same weights-only loader as model.pt.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeexit.errors import InputError
from edgeexit.train.models import atomic_save, safe_load

CHECKPOINT_FORMAT = "edgeexit-train-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class Checkpoint:
    """One training run's state after `epoch` finished epochs."""

    model_config: dict[str, Any]
    run: dict[str, Any]  # the training settings a resumed run must share (resume_settings)
    epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    rng: dict[str, Any]
    history: dict[str, Any] = field(default_factory=dict)
    best: dict[str, Any] = field(default_factory=dict)


def capture_rng(device: torch.device, data_order: torch.Generator | None = None) -> dict[str, Any]:
    """The RNG states of python, numpy, torch, (on CUDA) the device and the data-order generator, as tensors and plain data."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if data_order is not None:
        state["data_order"] = data_order.get_state()
    return state


def restore_rng(state: dict[str, Any], device: torch.device, data_order: torch.Generator | None = None) -> None:
    """Put back the RNG states `capture_rng` took."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["gauss"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    if data_order is not None and "data_order" in state:
        data_order.set_state(state["data_order"])


def checkpoint_path(directory: str | os.PathLike) -> Path:
    return Path(directory) / CHECKPOINT_FILE


def save_checkpoint(directory: str | os.PathLike, checkpoint: Checkpoint) -> Path:
    """Replace DIR/checkpoint.pt atomically: a run killed mid-write leaves the previous one intact."""
    path = checkpoint_path(directory)
    # the fields as they are: asdict would copy every tensor and drop the state_dicts' per-module versions (`_metadata`)
    state = {f.name: getattr(checkpoint, f.name) for f in fields(checkpoint)}
    atomic_save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, path)
    return path


def _differences(have: dict[str, Any], want: dict[str, Any]) -> str | None:
    """Every key whose value differs, "key old vs new" joined by commas (a changed --lr also moves head_lr)."""
    keys = [key for key in sorted(set(have) | set(want)) if have.get(key) != want.get(key)]
    return ", ".join(f"{key} {have.get(key)!r} vs {want.get(key)!r}" for key in keys) or None


def load_checkpoint(directory: str | os.PathLike, model_config: dict[str, Any], run: dict[str, Any]) -> Checkpoint | None:
    """The checkpoint in DIR (None when there is none yet), checked against this run's model and settings.

    InputError, before anything is written, for an unreadable or foreign file and for one
    written by another architecture or other settings (it could not continue this run).
    """
    path = checkpoint_path(directory)
    if not path.exists():
        return None
    data = safe_load(path, "a training checkpoint written by `edgeexit train --checkpoint-dir`")
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path} is not an edgeexit training checkpoint (missing format '{CHECKPOINT_FORMAT}')")
    if data.get("version") != CHECKPOINT_VERSION:
        raise InputError(f"{path} has checkpoint version {data.get('version')}; this edgeexit reads {CHECKPOINT_VERSION}")
    names = Checkpoint.__dataclass_fields__
    if not all(name in data for name in names):
        raise InputError(f"{path} lacks {', '.join(sorted(n for n in names if n not in data))}")
    checkpoint = Checkpoint(**{name: data[name] for name in names})
    differs = _differences(checkpoint.model_config, model_config)
    if differs:
        raise InputError(f"{path} was written for another model ({differs}); use another --checkpoint-dir")
    differs = _differences(checkpoint.run, run)
    if differs:
        raise InputError(f"{path} was written with other training settings ({differs}); resume with the same ones")
    return checkpoint
