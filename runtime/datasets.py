"""Torch-free input data: the embedded digits set, its fixed split, and image/.npy loading.

Both the trainer and the runtime read digits through this module, so the split a model
was tested on is the split `edgeexit run --data digits` evaluates.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeexit.runtime.cascade import check_batch
from edgeexit.errors import ConfigError, InputError
from edgeexit.runtime.manifest import InputSpec, resize, to_channels

SPLITS = ("train", "val", "test")
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
    """Indices of `split` in a fixed seeded 70/15/15 permutation of n samples."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}'; choose from: {', '.join(SPLITS)}")
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


def load_eval_data(spec_name: str, split: str, input_spec: InputSpec) -> tuple[np.ndarray, np.ndarray]:
    """Labeled evaluation data without torch: `digits` (a split) or `folder:PATH` (class subfolders)."""
    if spec_name == "digits":
        x, y = digits_split(split, input_spec.sample_shape)
        return input_spec.normalize(x), y
    if spec_name.startswith("folder:"):
        root = Path(spec_name[len("folder:") :])
        if not root.is_dir():
            raise InputError(f"image folder not found: {root}")
        sub = root / split
        return load_labeled_folder(sub if sub.is_dir() else root, input_spec)
    raise ConfigError(f"unknown data set '{spec_name}' for the runtime; use digits or folder:PATH")
