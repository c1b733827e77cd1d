"""Pixels: the one numpy preprocessing (resize, channel conversion, normalization) for model-ready batches.

InputSpec.preprocess, the data loaders and the exporter's checks all use these, so an image
file, an array and a training batch reach the graphs the same way.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from edgeexit.errors import InputError

# ITU-R 601 luma weights: Pillow's RGB -> "L" conversion, so arrays and image files agree
LUMA = (0.299, 0.587, 0.114)


def normalize(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Per-channel (x - mean) / std on NCHW float32."""
    mean_arr = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std_arr = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return ((x - mean_arr) / std_arr).astype(np.float32)


def _interp_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) bilinear interpolation weights, align_corners=False convention."""
    scale = size_in / size_out
    centers = np.clip((np.arange(size_out) + 0.5) * scale - 0.5, 0, size_in - 1)
    low = np.floor(centers).astype(int)
    high = np.minimum(low + 1, size_in - 1)
    frac = centers - low
    weights = np.zeros((size_out, size_in), dtype=np.float32)
    weights[np.arange(size_out), low] += 1 - frac
    weights[np.arange(size_out), high] += frac
    return weights


def resize(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of (..., H, W) arrays: half-pixel centres (align_corners=False), no antialiasing,
    i.e. torch.nn.functional.interpolate(mode="bilinear", align_corners=False, antialias=False)."""
    if images.shape[-2:] == (height, width):
        return images.astype(np.float32, copy=False)
    rows = _interp_matrix(images.shape[-2], height)
    cols = _interp_matrix(images.shape[-1], width)
    return np.einsum("hi,...ij,wj->...hw", rows, images, cols).astype(np.float32)


def to_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """NCHW with 1 or 3 channels -> `channels`: gray repeated to RGB, RGB to gray by ITU-R 601 luma."""
    have = x.shape[1]
    if have == channels:
        return x
    if have == 1:
        return np.repeat(x, channels, axis=1)
    if have == 3 and channels == 1:
        return np.tensordot(np.asarray(LUMA, dtype=np.float32), x, axes=([0], [1]))[:, None].astype(np.float32)
    raise InputError(f"cannot convert {have}-channel images to the bundle's {channels} channels")


def preprocess(images: np.ndarray, shape: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Float (N, C, h, w) images in [0, 1], any size, 1 or 3 channels -> the model-ready batch of sample shape (C, H, W)."""
    channels, height, width = shape
    return normalize(to_channels(resize(np.asarray(images, dtype=np.float32), height, width), channels), mean, std)
