"""Torch-free input data: the embedded digits set, its fixed split, and image/.npy loading.

Both the trainer and the runtime read digits through this module, so the split a model
was tested on is the split `edgeexit run --data digits` evaluates.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from edgeexit.runtime.cascade import check_batch
from edgeexit.errors import ConfigError, InputError, first_line
from edgeexit.extras import require
from edgeexit.registry import Registry
from edgeexit.runtime.manifest import InputSpec
from edgeexit.runtime.preprocess import resize, to_channels

SPLITS = ("train", "val", "test")
ALL_SPLIT = "all"  # evaluation only: every sample of a data set, no split
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)
SPLIT_SEED = 0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
DIGITS_CLASSES = [str(i) for i in range(10)]


def load_digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's load_digits (1,797 8x8 images, values 0..16), shipped in this package."""
    with resources.files("edgeexit.runtime").joinpath("digits.npz").open("rb") as fh:
        data = np.load(fh)
        return data["images"].astype(np.float32), data["target"].astype(np.int64)


def split_indices(n: int, split: str, seed: int = SPLIT_SEED, names: Sequence[str] = SPLITS,
                  fractions: Sequence[float] = SPLIT_FRACTIONS) -> np.ndarray:
    """Indices of `split` in a fixed seeded permutation of n samples cut into `names` by `fractions`
    (default: train/val/test 70/15/15; the last name takes what rounding leaves; "all": every index)."""
    if split == ALL_SPLIT:
        return np.arange(n)
    if split not in names:
        raise ConfigError(f"unknown split '{split}'; choose from: {', '.join(names)}, {ALL_SPLIT}")
    order = np.random.default_rng(seed).permutation(n)
    total = float(sum(fractions))
    sizes = [int(round(f / total * n)) for f in fractions[:-1]]
    stops = np.cumsum([0, *sizes, n - sum(sizes)])
    index = list(names).index(split)
    return np.sort(order[stops[index] : stops[index + 1]])


def digits_split(split: str, input_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Digits of one split as float32 (N, C, H, W) in [0, 1], resized to `input_shape`, and labels."""
    channels, height, width = input_shape
    images, labels = load_digits_raw()
    index = split_indices(len(images), split)
    x = to_channels(resize(images[index] / 16.0, height, width)[:, None], channels)
    return np.ascontiguousarray(x, dtype=np.float32), labels[index]


@dataclass(frozen=True)
class NpzData:
    """A labeled .npz data set: images as float32 (N, C, H, W) (uint8 files scaled to [0, 1]), labels, class names."""

    x: np.ndarray
    y: np.ndarray
    class_names: list[str]


def load_npz(path: str | Path) -> NpzData:
    """Read and check an .npz with `x` (uint8 (N, H, W[, C]) raw images or float32 (N, C, H, W)), `y`, optional `classes`.

    Every defect (unreadable file, missing key, wrong dtype or rank, mismatched lengths,
    labels outside the classes, non-finite pixels) is a one-line InputError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"npz data set not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"cannot read {path} as an .npz archive: {first_line(exc)[:200]}") from None
    missing = [key for key in ("x", "y") if key not in arrays]
    if missing:
        raise InputError(f"{path} has no '{missing[0]}' array (it holds: {', '.join(sorted(arrays)) or 'nothing'})")
    x, y = arrays["x"], arrays["y"]
    if x.dtype == np.uint8 and x.ndim in (3, 4):
        x = (x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)).astype(np.float32) / 255.0
    elif x.dtype == np.float32 and x.ndim == 4:
        if not np.isfinite(x).all():
            raise InputError(f"{path}: x holds NaN or inf values")
    else:
        raise InputError(
            f"{path}: x is {x.dtype} {x.shape}; give uint8 raw images (N, H, W) or (N, H, W, C), or float32 (N, C, H, W)"
        )
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise InputError(f"{path}: y must be a 1-D integer label array, got {y.dtype} {y.shape}")
    if len(x) != len(y):
        raise InputError(f"{path}: x has {len(x)} samples but y has {len(y)} labels")
    if 0 in x.shape:
        raise InputError(f"{path}: x holds no pixels: shape {x.shape}")
    names = [str(c) for c in arrays["classes"].tolist()] if "classes" in arrays else None
    if names is not None and (arrays["classes"].ndim != 1 or len(names) < 2):
        raise InputError(f"{path}: classes must be a 1-D array of at least two names, got shape {arrays['classes'].shape}")
    count = len(names) if names is not None else int(y.max()) + 1
    bad = (y < 0) | (y >= count)
    if bad.any():
        raise InputError(f"{path}: label {int(y[bad][0])} (sample {int(np.flatnonzero(bad)[0])}) is outside 0..{count - 1}")
    if count < 2:
        raise InputError(f"{path}: labels name only one class; a classifier needs at least two")
    return NpzData(x, y.astype(np.int64), names or [str(i) for i in range(count)])


def fit_images(x: np.ndarray, shape: Sequence[int], source: str) -> np.ndarray:
    """float32 (N, C, H, W) images resized to `shape` = (C, H, W), channels converted (gray <-> RGB)."""
    channels, height, width = shape
    if x.shape[1] != channels and x.shape[1] not in (1, 3):
        raise InputError(f"{source} has {x.shape[1]}-channel images; the model takes {channels}")
    return np.ascontiguousarray(to_channels(resize(x, height, width), channels), dtype=np.float32)


def npz_split(path: str | Path, split: str, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One split (fixed seeded 70/15/15, or "all") of an .npz data set at `shape`, unnormalized, with class names."""
    data = load_npz(path)
    index = split_indices(len(data.y), split)
    return fit_images(data.x[index], shape, str(path)), data.y[index], data.class_names


def _read_image(path: Path, spec: InputSpec) -> np.ndarray:
    """One image file as a model-ready (C, H, W) sample: decoded to gray or RGB, then spec.preprocess."""
    Image = require("PIL.Image", "reading image files", "pip install pillow")
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("L" if spec.channels == 1 else "RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # PIL's many failure types
        raise InputError(f"cannot read image {path}: {exc}") from None
    return spec.preprocess(arr[None, None] if spec.channels == 1 else arr.transpose(2, 0, 1)[None])[0]


def load_images(paths: Sequence[Path], spec: InputSpec) -> np.ndarray:
    """Image files -> the model-ready float32 (N, C, H, W) batch (resized, normalized)."""
    return np.stack([_read_image(p, spec) for p in paths]).astype(np.float32)


def image_files(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_npy(path: Path, spec: InputSpec) -> np.ndarray:
    """A .npy as a batch: float32 memory-mapped (huge files stay on disk), other floats cast,
    uint8 treated as raw images; any other dtype is an InputError."""
    shape = spec.sample_shape
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"cannot read {path} as a numpy array: {str(exc)[:200]}") from None
    if not isinstance(arr, np.ndarray):
        raise InputError(f"{path} holds several arrays; give a single-array .npy")
    if arr.dtype == np.uint8:
        if arr.ndim == 4 and arr.shape[-1] == shape[0]:
            arr = arr.transpose(0, 3, 1, 2)
        elif arr.ndim == 3 and shape[0] == 1:
            arr = arr[:, None]
        else:
            raise InputError(f"uint8 images in {path} must be (N, H, W[, {shape[0]}]), got {arr.shape}")
        if 0 in arr.shape:
            raise InputError(f"{path} holds no pixels: shape {arr.shape}")
        return spec.preprocess(arr.astype(np.float32) / 255.0)
    if arr.dtype.kind != "f":
        raise InputError(f"{path} has dtype {arr.dtype}; give float32 (preprocessed) or uint8 (raw images)")
    if arr.ndim not in (3, 4):
        raise InputError(f"{path} must hold (N, C, H, W) or (C, H, W) = {shape}, got shape {arr.shape}")
    if arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    return arr[None] if arr.ndim == 3 else arr


def load_input(path: str | Path, spec: InputSpec) -> tuple[np.ndarray, list[str]]:
    """Load `--input` (an image, a folder of images, or a .npy) as a model-ready batch plus names.

    A float .npy of shape (N, C, H, W) or (C, H, W) is taken as already preprocessed (cast
    to float32; a float32 file is memory-mapped, so a huge batch is read chunk by chunk).
    A uint8 .npy of shape (N, H, W) or (N, H, W, C) is treated as raw images (0..255).
    Images are scaled to [0, 1] and go through spec.preprocess (resize, normalize).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"input not found: {path}")
    if path.is_dir():
        files = image_files(path)
        if not files:
            raise InputError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {path}")
        return load_images(files, spec), [f.name for f in files]
    if path.suffix.lower() == ".npy":
        arr = check_batch(_read_npy(path, spec), spec.sample_shape)  # whole-file check: errors name the sample in the file
        return arr, [f"{path.name}[{i}]" for i in range(len(arr))]
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return load_images([path], spec), [path.name]
    raise InputError(f"unsupported input {path}: give an image, a folder of images or a .npy file")


def folder_classes(root: Path) -> list[str]:
    """Class names of an image folder: the sorted subfolders of root/train, or of root when it has no train/."""
    source = root / "train" if (root / "train").is_dir() else root
    return sorted(p.name for p in source.iterdir() if p.is_dir())


def _class_files(folder: Path, class_names: Sequence[str]) -> tuple[list[Path], list[int]]:
    """folder/CLASS/image files in (class folder, file name) order, labelled by their index in class_names."""
    files: list[Path] = []
    labels: list[int] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if sub.name not in class_names:
            raise InputError(f"folder {sub} is not one of the classes: {', '.join(class_names)}")
        found = image_files(sub)
        files += found
        labels += [list(class_names).index(sub.name)] * len(found)
    return files, labels


def folder_split(root: Path, split: str, class_names: Sequence[str]) -> tuple[list[Path], np.ndarray]:
    """Image files and labels of one split of an image folder: the same for training, `run` and `calibrate`.

    root/{train,val,test}/CLASS/*: each split is its folder; a val/ or test/ that is missing is
    carved out of train/ by the seeded split (train/ alone: 70/15/15; train/ and test/: train/val
    70/15), so validation never sees a training image. root/CLASS/* (no train/): the seeded
    70/15/15 split of all of it, as for digits.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}'; choose from: {', '.join(SPLITS)}")
    if not root.is_dir():
        raise InputError(f"image folder not found: {root}")
    has_train = (root / "train").is_dir()
    if has_train and split != "train" and (root / split).is_dir():
        files, labels = _class_files(root / split, class_names)
        parts = [split]
    else:
        files, labels = _class_files(root / "train" if has_train else root, class_names)
        parts = ["train", *(s for s in SPLITS[1:] if not (has_train and (root / s).is_dir()))]
    if not files:
        raise InputError(f"no labeled images for split '{split}' under {root} (expected {root}/CLASS/image.png)")
    if len(parts) > 1:
        index = split_indices(len(files), split, names=parts, fractions=[SPLIT_FRACTIONS[SPLITS.index(s)] for s in parts])
        files, labels = [files[i] for i in index], [labels[i] for i in index]
    return files, np.asarray(labels, dtype=np.int64)


EvalFn = Callable[[str | None, str, InputSpec, str | None], tuple[np.ndarray, np.ndarray]]  # (ARG of NAME:ARG, split, spec, data dir)


class TorchvisionSet(NamedTuple):
    """A torchvision data set: its class in torchvision.datasets, channels, native size, the mean/std training uses."""

    cls_name: str
    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class DataSource:
    """One `--data` choice, the single entry both sides read.

    `evaluate` loads a labeled split as model-ready arrays for a bundle. `train` loads the splits
    for training; the training side attaches it (`attach`), so this torch-free module never
    imports it, and a set read through torchvision gets its `evaluate` there too (it needs the
    training extra: `needs_torch`). `flips_keep_labels`: True, a horizontal mirror image keeps its
    class, so augmentation flips by default; False, it does not (digits and other glyphs) and a
    flip is refused; None, unknown (an .npz file): no flips unless asked for.
    """

    summary: str
    evaluate: EvalFn | None = None
    torchvision: TorchvisionSet | None = None
    flips_keep_labels: bool | None = False
    train: Callable[..., Any] | None = None

    @property
    def needs_torch(self) -> bool:
        return self.torchvision is not None


def _digits(arg: str | None, split: str, spec: InputSpec, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    x, y = digits_split(split, spec.sample_shape)
    return spec.normalize(x), y


def _folder(path: str | None, split: str, spec: InputSpec, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    files, labels = folder_split(Path(path), split, spec.class_names)
    return load_images(files, spec), labels


def _npz(path: str | None, split: str, spec: InputSpec, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    x, y, _ = npz_split(path, split, spec.sample_shape)
    num_classes = len(spec.class_names)
    if len(y) and int(y.max()) >= num_classes:
        raise InputError(f"npz:{path}: label {int(y.max())} is outside the bundle's {num_classes} classes")
    return spec.normalize(x), y


DEFAULT_DATA = "digits"  # the data set every command uses when --data is not given
DATASETS: Registry[DataSource] = Registry("data set")
DATASETS.register(DEFAULT_DATA, DataSource("scikit-learn's 8x8 digits, shipped with edgeexit", _digits))
for _name, _set, _flips in (
    ("mnist", TorchvisionSet("MNIST", 1, 28, (0.1307,), (0.3081,)), False),
    ("fashionmnist", TorchvisionSet("FashionMNIST", 1, 28, (0.2860,), (0.3530,)), True),
    ("cifar10", TorchvisionSet("CIFAR10", 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)), True),
    ("cifar100", TorchvisionSet("CIFAR100", 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)), True),
    ("svhn", TorchvisionSet("SVHN", 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)), False),
):
    DATASETS.register(_name, DataSource(f"torchvision {_set.cls_name} from --data-dir", torchvision=_set, flips_keep_labels=_flips))
DATASETS.register("npz", DataSource("PATH.npz with x (images), y (labels), optional classes; seeded 70/15/15 split", _npz,
                                    flips_keep_labels=None), arg="PATH")
DATASETS.register("folder", DataSource("PATH/CLASS/*.png (or PATH/SPLIT/CLASS/*.png), split as training splits it", _folder,
                                       flips_keep_labels=True), arg="PATH")


def attach(name: str, *, train: Callable[..., Any], evaluate: EvalFn | None = None) -> None:
    """The training side's loaders for entry `name`: `train` always, `evaluate` where this module has none."""
    source = dict(DATASETS.items())[name]
    source.train = train
    if evaluate is not None:
        source.evaluate = evaluate


def load_eval_data(name: str, split: str, input_spec: InputSpec, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Labeled evaluation data as the bundle's model-ready arrays, for any DATASETS name (`digits`, `folder:PATH`, ...).

    A torchvision set needs its loader from the training side: import edgeexit.train.data first
    (the CLI does, behind the training-extra guard)."""
    source, arg = DATASETS.resolve(name)
    if source.evaluate is None:
        raise ConfigError(f"data set '{name}' is read through torchvision: it needs the training side (edgeexit.train.data)")
    return source.evaluate(arg, split, input_spec, data_dir)
