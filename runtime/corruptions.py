"""Named image corruptions for robust calibration and shift tests: seeded, numpy only.

Every family maps raw images (float32 (N, C, H, W) in [0, 1], at the bundle's input size,
before normalization) and a severity level (1..MAX_SEVERITY) to images of the same shape and
range. Per-image parameters (angle, shift, noise) are drawn from a generator seeded by
`seed`, so the same call returns the same images. Geometric families sample bilinearly and
fill what leaves the frame with each image's border mean (its background).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from edgeexit.errors import ConfigError
from edgeexit.registry import Registry

MAX_SEVERITY = 5
DEFAULT_SEVERITY = 3
CorruptFn = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]  # (images, severity, rng) -> images
CORRUPTIONS: Registry[CorruptFn] = Registry("corruption family")  # name -> function; its docstring says what it does


def _severity(level: int, values: Sequence[float]) -> float:
    """The family's parameter at `level` (values holds one per level 1..MAX_SEVERITY)."""
    return float(values[level - 1])


def _border_mean(images: np.ndarray) -> np.ndarray:
    """Per image and channel, the mean of the outermost pixels: (N, C, 1, 1)."""
    rows = np.concatenate([images[:, :, 0, :], images[:, :, -1, :], images[:, :, :, 0], images[:, :, :, -1]], axis=2)
    return rows.mean(axis=2)[:, :, None, None]


def warp(images: np.ndarray, src_y: np.ndarray, src_x: np.ndarray) -> np.ndarray:
    """Bilinear resampling: output pixel (i, j) of image n reads images[n, :, src_y[n, i, j], src_x[n, i, j]];
    positions outside the frame read the image's border mean."""
    n, c, h, w = images.shape
    fill = _border_mean(images)
    y0, x0 = np.floor(src_y).astype(np.int64), np.floor(src_x).astype(np.int64)
    fy, fx = (src_y - y0)[:, None], (src_x - x0)[:, None]
    batch = np.arange(n)[:, None, None]

    def tap(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        inside = ((yy >= 0) & (yy < h) & (xx >= 0) & (xx < w))[:, None]
        values = images[batch, :, np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)].transpose(0, 3, 1, 2)
        return np.where(inside, values, fill)

    top = tap(y0, x0) * (1 - fx) + tap(y0, x0 + 1) * fx
    bottom = tap(y0 + 1, x0) * (1 - fx) + tap(y0 + 1, x0 + 1) * fx
    return top * (1 - fy) + bottom * fy


def _grid(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Pixel coordinates (H, W) relative to the image centre, and the centre."""
    h, w = images.shape[2:]
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    return yy - cy, xx - cx, cy, cx


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over H and W (edges reflected)."""
    if sigma <= 0:
        return images
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    out = images.astype(np.float64)
    for axis in (2, 3):
        size = out.shape[axis]
        index = np.arange(-radius, size + radius)
        index = np.abs(index)  # reflect at 0 ...
        index = np.where(index >= size, 2 * (size - 1) - index, index)  # ... and at size - 1
        padded = np.take(out, np.clip(index, 0, size - 1), axis=axis)
        out = sum(t * np.take(padded, np.arange(i, i + size), axis=axis) for i, t in enumerate(taps))
    return out


@CORRUPTIONS.register("rotation")
def rotation(images: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Rotate each image about its centre by +-(0.5..1) x the level's angle (10..50 degrees)."""
    limit = np.deg2rad(_severity(level, (10, 20, 30, 40, 50)))
    angle = rng.uniform(0.5, 1.0, len(images)) * limit * rng.choice([-1.0, 1.0], len(images))
    dy, dx, cy, cx = _grid(images)
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    return warp(images, cy + cos * dy - sin * dx, cx + sin * dy + cos * dx)


@CORRUPTIONS.register("translation")
def translation(images: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Shift each image by up to the level's fraction of its size (5..25%) in a random direction."""
    h, w = images.shape[2:]
    fraction = _severity(level, (0.05, 0.1, 0.15, 0.2, 0.25))
    shift = rng.uniform(-1.0, 1.0, (len(images), 2)) * fraction * np.array([h, w])
    dy, dx, cy, cx = _grid(images)
    return warp(images, cy + dy[None] - shift[:, 0, None, None], cx + dx[None] - shift[:, 1, None, None])


@CORRUPTIONS.register("elastic")
def elastic(images: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Elastic distortion (Simard et al.): a random displacement field smoothed by a Gaussian of a sixth of the
    image size, scaled to a peak of the level's fraction of the size (4..20%)."""
    n, _, h, w = images.shape
    size = min(h, w)
    field = gaussian_blur(rng.uniform(-1.0, 1.0, (n, 2, h, w)), size / 6.0)
    field /= np.abs(field).max(axis=(2, 3), keepdims=True) + 1e-12
    field *= _severity(level, (0.04, 0.08, 0.12, 0.16, 0.2)) * size
    dy, dx, cy, cx = _grid(images)
    return warp(images, cy + dy[None] + field[:, 0], cx + dx[None] + field[:, 1])


@CORRUPTIONS.register("blur")
def blur(images: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur with sigma the level's fraction of the image size (2..10%)."""
    return gaussian_blur(images, _severity(level, (0.02, 0.04, 0.06, 0.08, 0.1)) * min(images.shape[2:]))


@CORRUPTIONS.register("noise")
def noise(images: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian pixel noise, sigma 0.04..0.2."""
    return images + rng.normal(0.0, _severity(level, (0.04, 0.08, 0.12, 0.16, 0.2)), images.shape)


@CORRUPTIONS.register("contrast")
def contrast(images: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Contrast scaled about each image's mean by 0.7..0.3."""
    mean = images.mean(axis=(1, 2, 3), keepdims=True)
    return mean + (images - mean) * _severity(level, (0.7, 0.6, 0.5, 0.4, 0.3))


@CORRUPTIONS.register("brightness")
def brightness(images: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Every pixel raised by 0.1..0.5 (clipped at 1)."""
    return images + _severity(level, (0.1, 0.2, 0.3, 0.4, 0.5))


@CORRUPTIONS.register("stroke")
def stroke(images: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Stroke width: a grey-scale dilation (half the images, thicker strokes) or erosion (thinner) with a square of
    radius 1, 1, 2, 2, 3 pixels by level (per 28 pixels of image size), for bright glyphs on dark ground."""
    h, w = images.shape[2:]
    radius = int(_severity(level, (1, 1, 2, 2, 3))) * max(1, round(min(h, w) / 28))
    dilate = rng.random(len(images)) < 0.5
    padded = np.pad(images, ((0, 0), (0, 0), (radius, radius), (radius, radius)), mode="edge")
    windows = [padded[:, :, i : i + h, j : j + w] for i in range(2 * radius + 1) for j in range(2 * radius + 1)]
    return np.where(dilate[:, None, None, None], np.max(windows, axis=0), np.min(windows, axis=0))


def corrupt(images: np.ndarray, family: str, severity: int = DEFAULT_SEVERITY, seed: int = 0) -> np.ndarray:
    """Raw images (float (N, C, H, W) in [0, 1]) under one family at `severity`: same shape, float32, in [0, 1]."""
    apply = CORRUPTIONS.get(family)
    if not (isinstance(severity, (int, np.integer)) and 1 <= severity <= MAX_SEVERITY):
        raise ConfigError(f"corruption severity must be an integer 1..{MAX_SEVERITY}, got {severity!r}")
    if images.ndim != 4:
        raise ConfigError(f"corruptions take (N, C, H, W) images, got shape {images.shape}")
    out = apply(images.astype(np.float64), int(severity), np.random.default_rng(seed))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def raw_images(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Model-ready inputs back to raw images in [0, 1]: x * std + mean per channel (undoes InputSpec.normalize)."""
    shape = (1, -1, 1, 1)
    return x.astype(np.float64) * np.asarray(std, np.float64).reshape(shape) + np.asarray(mean, np.float64).reshape(shape)


def corrupt_model_ready(x: np.ndarray, mean: Sequence[float], std: Sequence[float], family: str,
                        severity: int = DEFAULT_SEVERITY, seed: int = 0) -> np.ndarray:
    """Model-ready inputs under a family: denormalized, corrupted, normalized again (float32)."""
    images = corrupt(np.clip(raw_images(x, mean, std), 0.0, 1.0), family, severity, seed)
    shape = (1, -1, 1, 1)
    return ((images - np.asarray(mean, np.float32).reshape(shape)) / np.asarray(std, np.float32).reshape(shape)).astype(np.float32)


def parse_families(text: str | None) -> list[str]:
    """`a,b,c` -> checked family names (None or empty: every registered family)."""
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    for name in names:
        CORRUPTIONS.get(name)
    if len(set(names)) != len(names):
        raise ConfigError(f"corruption families listed twice: {text}")
    return names or list(CORRUPTIONS)
