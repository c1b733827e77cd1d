"""The one MAC counter: multiply-accumulates of convolutions and matrix products, for costs and manifests."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def macs_counter() -> FlopCounterMode:
    """A silent flop counter: convolutions and matrix products (attention's too), at the aten level."""
    return FlopCounterMode(display=False)


def count_macs(module: nn.Module, input_shape: Sequence[int]) -> int:
    """MACs of module(x) for one sample of shape `input_shape` (C, H, W): half the flops of convs and matmuls.

    Counted at the aten level (torch.utils.flop_counter), so module layers, functional calls,
    attention matmuls and torch.export programs' aten graphs count alike; bias adds, norms and
    activations are not counted. For conv/linear networks it equals summing each layer's MACs.
    """
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), macs_counter() as counter:
            module(torch.zeros(1, *input_shape))
    finally:
        module.train(was_training)
    return counter.get_total_flops() // 2


def count_params(module: nn.Module) -> int:
    """Number of parameters (shared ones counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
