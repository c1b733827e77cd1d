"""Torch-free input data: the embedded digits set, its fixed split, and image/.npy loading.

Both the trainer and the runtime read digits through this module, so the split a model
was tested on is the split `edgeexit run --data digits` evaluates.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeexit.runtime.cascade import check_batch
from edgeexit.errors import ConfigError, InputError, first_line
from edgeexit.runtime.manifest import InputSpec, resize, to_channels

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


def split_indices(n: int, split: str, seed: int = SPLIT_SEED) -> np.ndarray:
    """Indices of `split` in a fixed seeded 70/15/15 permutation of n samples ("all": every index)."""
    if split == ALL_SPLIT:
        return np.arange(n)
    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}'; choose from: {', '.join(SPLITS)}, {ALL_SPLIT}")
    order = np.random.default_rng(seed).permutation(n)
    n_train = int(round(SPLIT_FRACTIONS[0] * n))
    n_val = int(round(SPLIT_FRACTIONS[1] * n))
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
    start, stop = bounds[split]
    return np.sort(order[start:stop])


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
    try:
        from PIL import Image
    except ImportError:
        raise InputError("reading image files needs Pillow: pip install pillow") from None
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


def load_labeled_folder(root: Path, spec: InputSpec) -> tuple[np.ndarray, np.ndarray]:
    """root/CLASS/*.png with CLASS among the bundle's class names -> normalized batch and labels."""
    names = list(spec.class_names)
    files, labels = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name not in names:
            raise InputError(f"folder {folder} is not one of the bundle's classes: {', '.join(names)}")
        found = image_files(folder)
        files += found
        labels += [names.index(folder.name)] * len(found)
    if not files:
        raise InputError(f"no labeled images under {root} (expected {root}/CLASS/image.png)")
    return load_images(files, spec), np.asarray(labels, dtype=np.int64)


TORCH_FREE_DATA = ("digits", "npz:PATH", "folder:PATH")


def is_torch_free(spec_name: str) -> bool:
    """Whether the runtime reads this --data spec itself (no torchvision)."""
    return spec_name == "digits" or spec_name.startswith(("npz:", "folder:"))


def load_eval_data(spec_name: str, split: str, input_spec: InputSpec) -> tuple[np.ndarray, np.ndarray]:
    """Labeled evaluation data without torch: `digits` or `npz:PATH` (a split or "all"), `folder:PATH` (class subfolders)."""
    if spec_name == "digits":
        x, y = digits_split(split, input_spec.sample_shape)
        return input_spec.normalize(x), y
    if spec_name.startswith("npz:"):
        x, y, _ = npz_split(spec_name[len("npz:") :], split, input_spec.sample_shape)
        num_classes = len(input_spec.class_names)
        if len(y) and int(y.max()) >= num_classes:
            raise InputError(f"{spec_name}: label {int(y.max())} is outside the bundle's {num_classes} classes")
        return input_spec.normalize(x), y
    if spec_name.startswith("folder:"):
        root = Path(spec_name[len("folder:") :])
        if not root.is_dir():
            raise InputError(f"image folder not found: {root}")
        sub = root / split
        return load_labeled_folder(sub if sub.is_dir() else root, input_spec)
    raise ConfigError(f"unknown data set '{spec_name}' for the runtime; use {', '.join(TORCH_FREE_DATA)}")
