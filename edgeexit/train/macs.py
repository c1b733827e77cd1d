"""The one MAC counter: multiply-accumulates of conv and linear layers, for costs and manifests."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def layer_macs(module: nn.Module, output_shape: Sequence[int]) -> int:
    """MACs of one conv/linear layer for one sample, given its output shape (batch dim first)."""
    out_elems = 1
    for dim in output_shape[1:]:
        out_elems *= int(dim)
    if isinstance(module, nn.Conv2d):
        return out_elems * (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
    if isinstance(module, nn.Linear):
        return out_elems * module.in_features
    return 0


def count_macs(module: nn.Module, input_shape: Sequence[int]) -> int:
    """MACs of module(x) for one sample of shape `input_shape` (C, H, W), measured with hooks.

    Hooks see nn.Conv2d and nn.Linear modules, which is where every registered backbone and exit
    head does its multiply-accumulates (fx segments call the same modules). Functional convolutions
    or matmuls (e.g. the attention of torchvision's ViT/Swin) are not counted: such a backbone's
    costs come out low, and torch.utils.flop_counter would be the tool for it.
    """
    total = 0

    def hook(layer: nn.Module, _inputs, output) -> None:
        nonlocal total
        total += layer_macs(layer, output.shape)

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            module(torch.zeros(1, *input_shape))
    finally:
        module.train(was_training)
        for handle in handles:
            handle.remove()
    return total


def count_params(module: nn.Module) -> int:
    """Number of parameters (shared ones counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
