"""Training data: the training side's loaders for the DATASETS entries, and the training split's augmentation.

`load_data(name)` returns train/val/test torch datasets and a DataInfo recording the input
shape, normalization and class names that go into model.pt and the manifest. Every split
holds raw images in [0, 1] and normalizes them as it hands them out (`Prepared`), so the
training split's augmentation (edgeexit.train.augment) transforms raw images before
normalization, drawn anew for every item and epoch, while val and test never change.
Importing this module attaches its loaders to the runtime's DATASETS entries (runtime.datasets.attach).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset

from edgeexit.errors import ConfigError, InputError, first_line
from edgeexit.runtime.datasets import (
    ALL_SPLIT, DATASETS, DIGITS_CLASSES, SPLITS, attach, digits_split, fit_images, folder_classes, folder_split,
    load_npz, split_indices,
)
from edgeexit.runtime.manifest import InputSpec
from edgeexit.train.augment import default_augment, resolve_flip, transform
from edgeexit.train.config import TrainSpec

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


class Prepared(Dataset):
    """A split as the model sees it: raw [0, 1] images, `augment`ed (training only), then normalized."""

    def __init__(self, raw: Dataset, mean: list[float], std: list[float], augment: Callable | None = None) -> None:
        self.raw, self.augment = raw, augment
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, y = self.raw[index]
        if self.augment is not None:
            x = self.augment(x)
        return (x - self.mean) / self.std, int(y)

    def arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every item stacked: (x, y) in order."""
        xs, ys = zip(*[(x, y) for x, y in DataLoader(self, batch_size=512)])
        return torch.cat(xs), torch.cat(ys)


@dataclass
class DataSplits:
    """Train/val/test of one data set; `augment` (None: none) transforms the training split's raw images."""

    train: Prepared
    val: Prepared
    test: Prepared
    info: DataInfo
    augment: Callable | None = None

    def training_set(self) -> Prepared:
        """The training split as the optimizer sees it: augmented (a new draw per item and epoch) when asked."""
        return Prepared(self.train.raw, self.info.mean, self.info.std, self.augment) if self.augment else self.train


def _splits(raw: dict[str, Dataset], info: DataInfo) -> DataSplits:
    return DataSplits(*(Prepared(raw[s], info.mean, info.std) for s in SPLITS), info)


def _tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y).long())


def load_digits_data(input_size: int | None = None, channels: int | None = None) -> DataSplits:
    """scikit-learn's digits, resized to input_size (default 32), split 70/15/15 with a fixed seed."""
    channels = channels or 1
    shape = (channels, input_size or 32, input_size or 32)
    parts = {split: digits_split(split, shape) for split in SPLITS}
    x_train = parts["train"][0]
    info = DataInfo(shape, [float(x_train.mean())] * channels, [float(x_train.std())] * channels, list(DIGITS_CLASSES))
    return _splits({split: _tensors(x, y) for split, (x, y) in parts.items()}, info)


def load_npz_data(path: str, input_size: int | None = None, channels: int | None = None) -> DataSplits:
    """An .npz data set (x, y, optional classes), split 70/15/15 with the digits seed; mean/std from the training split."""
    data = load_npz(path)
    native_channels, height, width = data.x.shape[1:]
    shape = (channels or native_channels, input_size or height, input_size or width)
    parts = {split: split_indices(len(data.y), split) for split in SPLITS}
    arrays = {split: fit_images(data.x[index], shape, f"npz:{path}") for split, index in parts.items()}
    x_train = arrays["train"]
    mean = [float(v) for v in x_train.mean(axis=(0, 2, 3))]
    std = [max(float(v), 1e-6) for v in x_train.std(axis=(0, 2, 3))]
    return _splits({split: _tensors(arrays[split], data.y[parts[split]]) for split in SPLITS},
                   DataInfo(shape, mean, std, data.class_names))


def _to_tensor(input_size: int) -> Callable:
    """PIL image -> resized float32 (C, H, W) tensor in [0, 1]."""
    from torchvision.transforms import v2

    return v2.Compose([v2.ToImage(), v2.Resize((input_size, input_size), antialias=True), v2.ToDtype(torch.float32, scale=True)])


def _train_val(dataset: Dataset) -> tuple[Subset, Subset]:
    """A fixed seeded 90/10 train/val split of a training set."""
    order = np.random.default_rng(VAL_SEED).permutation(len(dataset))
    cut = int(round(0.9 * len(order)))
    return Subset(dataset, np.sort(order[:cut]).tolist()), Subset(dataset, np.sort(order[cut:]).tolist())


def load_torchvision_data(name: str, data_dir: str | None, download: bool = False, input_size: int | None = None) -> DataSplits:
    """MNIST / FashionMNIST / CIFAR10 / CIFAR100 / SVHN from `data_dir`; downloads only when asked to."""
    import torchvision.datasets as tvd

    cls_name, channels, native, mean, std = DATASETS.get(name).torchvision
    if data_dir is None:
        raise ConfigError(f"--data {name} needs --data-dir (add --download to fetch it there)")
    size = input_size or native
    transform = _to_tensor(size)
    cls = getattr(tvd, cls_name)
    try:
        if cls_name == "SVHN":
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
    return _splits({"train": train, "val": val, "test": test}, DataInfo((channels, size, size), list(mean), list(std), classes))


def torchvision_eval(name: str) -> Callable:
    """The evaluate loader of torchvision set `name`: a split (or "all" three) as the bundle's model-ready arrays,
    resized to its input size, converted to its channel count and normalized with its mean/std, never the set's own."""

    def evaluate(arg: str | None, split: str, spec: InputSpec, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        if split not in (*SPLITS, ALL_SPLIT):
            raise ConfigError(f"unknown split '{split}'; choose from: {', '.join(SPLITS)}, {ALL_SPLIT}")
        splits = load_torchvision_data(name, data_dir, input_size=spec.sample_shape[1])
        raw = ConcatDataset([getattr(splits, s).raw for s in SPLITS]) if split == ALL_SPLIT else getattr(splits, split).raw
        xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in DataLoader(raw, batch_size=512)])
        return spec.preprocess(np.concatenate(xs)), np.concatenate(ys)

    return evaluate


class ImageFiles(Dataset):
    """Labeled image files read with PIL as raw [0, 1] tensors."""

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


def load_folder_data(root: str, input_size: int | None = None, channels: int | None = None) -> DataSplits:
    """Image folder data split exactly as the runtime splits it (runtime.datasets.folder_split):
    root/{train,val,test}/CLASS/* (a missing val/ or test/ carved out of train/), else root/CLASS/* 70/15/15."""
    channels = channels or 3
    root_path = Path(root)
    if not root_path.is_dir():
        raise InputError(f"image folder not found: {root}")
    classes = folder_classes(root_path)
    if len(classes) < 2:
        raise InputError(f"image folder {root} needs at least two class subfolders, found {len(classes)}")
    size = input_size or 32
    to_tensor, mode = _to_tensor(size), ("L" if channels == 1 else "RGB")
    raw = {split: ImageFiles(*folder_split(root_path, split, classes), to_tensor, mode) for split in SPLITS}
    return _splits(raw, DataInfo((channels, size, size), [0.5] * channels, [0.5] * channels, classes))


# the training side of each DATASETS entry: (ARG of NAME:ARG, data dir, download, input size, channels) -> splits
attach("digits", train=lambda arg, data_dir, download, size, channels: load_digits_data(size, channels))
attach("npz", train=lambda path, data_dir, download, size, channels: load_npz_data(path, size, channels))
attach("folder", train=lambda path, data_dir, download, size, channels: load_folder_data(path, size, channels))
for _name, _source in DATASETS.items():
    if _source.needs_torch:
        attach(_name, train=lambda arg, data_dir, download, size, channels, name=_name:
               load_torchvision_data(name, data_dir, download, size), evaluate=torchvision_eval(_name))


def load_data(name: str, data_dir: str | None = None, download: bool = False, input_size: int | None = None,
              channels: int | None = None) -> DataSplits:
    """Resolve a --data name (a DATASETS entry: digits, a torchvision set, npz:PATH, folder:PATH) to its splits."""
    source, arg = DATASETS.resolve(name)
    return source.train(arg, data_dir, download, input_size, channels)


def training_splits(spec: TrainSpec) -> tuple[DataSplits, TrainSpec]:
    """The splits of spec.data with the training split's augmentation, and the spec with augment and flip resolved."""
    flip = resolve_flip(spec.data, spec.flip)  # a refused flip fails before the data is read
    splits = load_data(spec.data, data_dir=spec.data_dir, download=spec.download, input_size=spec.input_size)
    augment = spec.augment or default_augment(spec.epochs, len(splits.train))
    return replace(splits, augment=transform(augment, splits.info.input_shape, flip)), replace(spec, augment=augment, flip=flip)
