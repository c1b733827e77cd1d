"""Training data: the embedded digits set, torchvision data sets and ImageFolder paths.

`load_data(spec)` returns train/val/test torch datasets and a DataInfo recording the
input shape, normalization and class names that go into model.pt and the manifest.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from edgeexit.runtime.datasets import DIGITS_CLASSES, digits_split, split_indices
from edgeexit.errors import ConfigError, InputError, first_line

VAL_SEED = 0


@dataclass
class DataInfo:
    """What a model must know of its data: input shape, normalization, class names."""

    input_shape: tuple[int, int, int]
    mean: list[float]
    std: list[float]
    class_names: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    test: Dataset
    info: DataInfo


def _normalized(x: np.ndarray, y: np.ndarray, mean: list[float], std: list[float]) -> TensorDataset:
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    return TensorDataset((torch.from_numpy(x) - mean_t) / std_t, torch.from_numpy(y).long())


def load_digits_data(input_size: int = 32, channels: int = 1) -> DataSplits:
    """scikit-learn's digits, resized to input_size, split 70/15/15 with a fixed seed."""
    shape = (channels, input_size, input_size)
    parts = {split: digits_split(split, shape) for split in ("train", "val", "test")}
    x_train = parts["train"][0]
    mean = [float(x_train.mean())] * channels
    std = [float(x_train.std())] * channels
    sets = {split: _normalized(x, y, mean, std) for split, (x, y) in parts.items()}
    return DataSplits(sets["train"], sets["val"], sets["test"], DataInfo(shape, mean, std, list(DIGITS_CLASSES)))


# name -> (torchvision class name, channels, native size, mean, std)
TORCHVISION_SETS: dict[str, tuple[str, int, int, list[float], list[float]]] = {
    "mnist": ("MNIST", 1, 28, [0.1307], [0.3081]),
    "cifar10": ("CIFAR10", 3, 32, [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
    "cifar100": ("CIFAR100", 3, 32, [0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
    "svhn": ("SVHN", 3, 32, [0.4377, 0.4438, 0.4728], [0.1980, 0.2010, 0.1970]),
}


def _transform(input_size: int, mean: list[float], std: list[float]) -> Callable:
    from torchvision import transforms

    return transforms.Compose(
        [transforms.Resize((input_size, input_size)), transforms.ToTensor(), transforms.Normalize(mean, std)]
    )


def _train_val(dataset: Dataset) -> tuple[Subset, Subset]:
    """A fixed seeded 90/10 train/val split of a training set."""
    order = np.random.default_rng(VAL_SEED).permutation(len(dataset))
    cut = int(round(0.9 * len(order)))
    return Subset(dataset, np.sort(order[:cut]).tolist()), Subset(dataset, np.sort(order[cut:]).tolist())


def load_torchvision_data(name: str, data_dir: str | None, download: bool, input_size: int | None) -> DataSplits:
    """MNIST / CIFAR10 / CIFAR100 / SVHN from `data_dir`; downloads only when asked to."""
    import torchvision.datasets as tvd

    cls_name, channels, native, mean, std = TORCHVISION_SETS[name]
    if data_dir is None:
        raise ConfigError(f"--data {name} needs --data-dir (add --download to fetch it there)")
    size = input_size or native
    transform = _transform(size, mean, std)
    cls = getattr(tvd, cls_name)
    try:
        if name == "svhn":
            train_full = cls(data_dir, split="train", transform=transform, download=download)
            test = cls(data_dir, split="test", transform=transform, download=download)
            classes = [str(i) for i in range(10)]
        else:
            train_full = cls(data_dir, train=True, transform=transform, download=download)
            test = cls(data_dir, train=False, transform=transform, download=download)
            classes = [str(c) for c in train_full.classes]
    except RuntimeError as exc:
        raise InputError(f"cannot load {name} from {data_dir}: {exc} (pass --download to fetch it)") from None
    train, val = _train_val(train_full)
    return DataSplits(train, val, test, DataInfo((channels, size, size), mean, std, classes))


def load_folder_data(root: str, input_size: int | None, channels: int = 3) -> DataSplits:
    """ImageFolder data: root/{train,val,test}/CLASS/*.png if those exist, else root/CLASS/* split 70/15/15."""
    from torchvision import datasets, transforms

    root_path = Path(root)
    if not root_path.is_dir():
        raise InputError(f"image folder not found: {root}")
    size = input_size or 32
    mean, std = [0.5] * channels, [0.5] * channels
    steps = [transforms.Resize((size, size))]
    if channels == 1:
        steps.append(transforms.Grayscale(1))
    transform = transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(mean, std)])
    try:
        if (root_path / "train").is_dir():
            sets = {}
            for split in ("train", "val", "test"):
                folder = root_path / split if (root_path / split).is_dir() else root_path / "train"
                sets[split] = datasets.ImageFolder(str(folder), transform=transform)
            classes = sets["train"].classes
        else:
            full = datasets.ImageFolder(str(root_path), transform=transform)
            classes = full.classes
            sets = {split: Subset(full, split_indices(len(full), split).tolist()) for split in ("train", "val", "test")}
    except (FileNotFoundError, OSError) as exc:
        raise InputError(f"cannot read image folder {root}: {first_line(exc)}") from None
    if len(classes) < 2:
        raise InputError(f"image folder {root} needs at least two class subfolders, found {len(classes)}")
    return DataSplits(sets["train"], sets["val"], sets["test"], DataInfo((channels, size, size), mean, std, list(classes)))


DATASET_NAMES = ("digits", *TORCHVISION_SETS, "folder:PATH")


def load_data(
    spec: str,
    data_dir: str | None = None,
    download: bool = False,
    input_size: int | None = None,
    channels: int | None = None,
) -> DataSplits:
    """Resolve a --data spec (digits, mnist, cifar10, cifar100, svhn, folder:PATH) to splits."""
    if spec == "digits":
        return load_digits_data(input_size or 32, channels or 1)
    if spec in TORCHVISION_SETS:
        return load_torchvision_data(spec, data_dir, download, input_size)
    if spec.startswith("folder:"):
        return load_folder_data(spec[len("folder:") :], input_size, channels or 3)
    raise ConfigError(f"unknown data set '{spec}'; choose from: {', '.join(DATASET_NAMES)}")
