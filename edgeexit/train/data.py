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

from edgeexit.registry import Registry
from edgeexit.runtime.datasets import DATASETS, DIGITS_CLASSES, SPLITS, TorchvisionSet, digits_split, folder_classes, folder_split
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


TORCHVISION_SETS: dict[str, TorchvisionSet] = {name: src.torchvision for name, src in DATASETS.items() if src.torchvision}


def _transform(input_size: int, mean: list[float] | None, std: list[float] | None) -> Callable:
    """Resize, to a [0, 1] tensor, then normalize (skipped when mean is None: the caller normalizes)."""
    from torchvision import transforms

    steps = [transforms.Resize((input_size, input_size)), transforms.ToTensor()]
    return transforms.Compose(steps if mean is None else [*steps, transforms.Normalize(mean, std)])


def _train_val(dataset: Dataset) -> tuple[Subset, Subset]:
    """A fixed seeded 90/10 train/val split of a training set."""
    order = np.random.default_rng(VAL_SEED).permutation(len(dataset))
    cut = int(round(0.9 * len(order)))
    return Subset(dataset, np.sort(order[:cut]).tolist()), Subset(dataset, np.sort(order[cut:]).tolist())


def load_torchvision_data(name: str, data_dir: str | None, download: bool, input_size: int | None,
                          normalized: bool = True) -> DataSplits:
    """MNIST / CIFAR10 / CIFAR100 / SVHN from `data_dir`; downloads only when asked to. Unless `normalized`,
    images stay in [0, 1] (evaluation normalizes with the bundle's own InputSpec instead)."""
    import torchvision.datasets as tvd

    cls_name, channels, native, mean, std = TORCHVISION_SETS[name]
    if data_dir is None:
        raise ConfigError(f"--data {name} needs --data-dir (add --download to fetch it there)")
    size = input_size or native
    transform = _transform(size, mean, std) if normalized else _transform(size, None, None)
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
    return DataSplits(train, val, test, DataInfo((channels, size, size), list(mean), list(std), classes))


class ImageFiles(Dataset):
    """Labeled image files read with PIL and a torchvision transform."""

    def __init__(self, files: list[Path], labels: np.ndarray, transform: Callable, mode: str) -> None:
        self.files, self.labels, self.transform, self.mode = files, labels, transform, mode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        try:
            with Image.open(self.files[index]) as image:
                return self.transform(image.convert(self.mode)), int(self.labels[index])
        except OSError as exc:
            raise InputError(f"cannot read image {self.files[index]}: {first_line(exc)}") from None


def load_folder_data(root: str, input_size: int | None, channels: int = 3) -> DataSplits:
    """Image folder data split exactly as the runtime splits it (runtime.datasets.folder_split):
    root/{train,val,test}/CLASS/* (a missing val/ or test/ carved out of train/), else root/CLASS/* 70/15/15."""
    from torchvision import transforms

    root_path = Path(root)
    if not root_path.is_dir():
        raise InputError(f"image folder not found: {root}")
    classes = folder_classes(root_path)
    if len(classes) < 2:
        raise InputError(f"image folder {root} needs at least two class subfolders, found {len(classes)}")
    size = input_size or 32
    mean, std = [0.5] * channels, [0.5] * channels
    transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(mean, std)])
    mode = "L" if channels == 1 else "RGB"
    sets = {split: ImageFiles(*folder_split(root_path, split, classes), transform, mode) for split in SPLITS}
    return DataSplits(sets["train"], sets["val"], sets["test"], DataInfo((channels, size, size), mean, std, classes))


# how the training side reads each DATASETS entry that is not a torchvision set: (ARG, input size, channels) -> splits
TRAINING_LOADERS: Registry[Callable[[str | None, int | None, int | None], DataSplits]] = Registry("data set")
TRAINING_LOADERS.register("digits", lambda arg, size, channels: load_digits_data(size or 32, channels or 1))
TRAINING_LOADERS.register("folder", lambda path, size, channels: load_folder_data(path, size, channels or 3))


def load_data(
    spec: str,
    data_dir: str | None = None,
    download: bool = False,
    input_size: int | None = None,
    channels: int | None = None,
) -> DataSplits:
    """Resolve a --data spec (a DATASETS name: digits, mnist, cifar10, cifar100, svhn, folder:PATH) to splits."""
    source, arg = DATASETS.resolve(spec)
    if source.torchvision is not None:
        return load_torchvision_data(spec, data_dir, download, input_size)
    return TRAINING_LOADERS.get(spec.partition(":")[0])(arg, input_size, channels)
