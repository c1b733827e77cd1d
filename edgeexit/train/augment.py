"""Augmentation of the training split: named recipes on torchvision.transforms.v2, applied to raw [0, 1] images.

Torch is imported only when a recipe is built, so the CLI lists the choices without it. A
recipe's transforms run per item (train.data.Prepared), before normalization, so every
epoch draws new crops and flips; val and test are never augmented. Whether a recipe flips is
the data set's call (its DATASETS entry), which `--flip/--no-flip` overrides, except that a
flip is refused where a mirror image changes the class (digits and other glyphs).
"""
from __future__ import annotations

import math
from typing import Callable

from edgeexit.errors import ConfigError
from edgeexit.registry import Registry
from edgeexit.runtime.datasets import DATASETS

SMALL_INPUT = 64  # px: up to this side `basic` pads and crops (the CIFAR recipe); above it, a random-resized crop
Shape = tuple[int, int, int]


def _basic(shape: Shape, flip: bool) -> list:
    from torchvision.transforms import v2

    _, height, width = shape
    if max(height, width) <= SMALL_INPUT:  # 1/8 of the side: 4 px at 32 as for CIFAR, 3 at 28, 2 at 16
        crop = v2.RandomCrop((height, width), padding=max(1, min(height, width) // 8), padding_mode="reflect")
    else:
        crop = v2.RandomResizedCrop((height, width), antialias=True)
    return [crop, *([v2.RandomHorizontalFlip()] if flip else [])]


def _trivial(shape: Shape, flip: bool) -> list:
    import torch
    from torchvision.transforms import v2

    # TrivialAugmentWide's ops (posterize, equalize, ...) work on uint8 images: round-trip through them
    return [*_basic(shape, flip), v2.ToDtype(torch.uint8, scale=True), v2.TrivialAugmentWide(),
            v2.ToDtype(torch.float32, scale=True)]


# name -> (C, H, W) of the model's input, flip -> the v2 transforms of the recipe
AUGMENTS: Registry[Callable[[Shape, bool], list]] = Registry("augmentation")
AUGMENTS.register("none", lambda shape, flip: [])
AUGMENTS.register("basic", _basic)
AUGMENTS.register("trivial", _trivial)


def transform(augment: str, shape: Shape, flip: bool) -> Callable | None:
    """The recipe `augment` as one transform of a raw (C, H, W) image (None for `none`)."""
    steps = AUGMENTS.get(augment)(shape, flip)
    if not steps:
        return None
    from torchvision.transforms import v2

    return v2.Compose(steps)


def resolve_flip(name: str, flip: bool | None) -> bool:
    """Whether recipes flip images of data set `name`: its DATASETS entry's say unless `flip` overrides it;
    a flip asked for where mirror images change the class (digits, glyphs) is a ConfigError."""
    source = DATASETS.resolve(name)[0]
    if flip and source.flips_keep_labels is False:
        raise ConfigError(f"--flip: a mirrored image of data set '{name}' is not of the same class (glyphs); drop --flip")
    return bool(source.flips_keep_labels) if flip is None else flip


# Measured (benchmarks/augment_schedule.py: resnet8 `pretrain` on 6,000 Fashion-MNIST training images, SGD one-cycle,
# basic with flips; test accuracy none -> basic): 4 epochs 0.7900 -> 0.7605 (-3.0 points), 15 epochs 0.8538 -> 0.8546
# (+0.1), 30 epochs 0.8507 -> 0.8771 (+2.6); resnet20 at 30 epochs +1.7. On all 42,000 training images it still cost
# at 15 epochs (eenet resnet20: full.onnx 0.9190 with basic, 0.9219 without; the resnet8 at 4 epochs: -2.3).
# Short schedules lose to the harder task, long ones overfit without it, and a larger set overfits later: the
# break-even grows with the set. Growing it as the square root of the set size is an assumption (40 epochs at 42,000
# images), not a measurement; below 6,000 images the measured 15 epochs hold.
AUGMENT_FROM_EPOCHS = 15  # the break-even measured on AUGMENT_MEASURED_IMAGES training images
AUGMENT_MEASURED_IMAGES = 6000


def augment_from_epochs(images: int) -> int:
    """The fewest epochs from which `basic` is the default for a training split of `images` images."""
    return math.ceil(AUGMENT_FROM_EPOCHS * max(1.0, math.sqrt(images / AUGMENT_MEASURED_IMAGES)))


def default_augment(epochs: int, images: int) -> str:
    """The recipe `--augment` defaults to for `epochs` epochs over `images` training images (measured, see above)."""
    return "basic" if epochs >= augment_from_epochs(images) else "none"
