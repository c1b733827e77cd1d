"""Loss registry: name -> training objective over all exits' outputs.

A loss takes the exits' outputs (tuples in each exit's `outputs` order), the final
logits, the targets, each exit's relative cost (EarlyExitModel.exit_costs: MACs of the
segments and heads run up to that exit / full backbone MACs, the exporter's numbers; the
last entry is the final classifier's) and lambda, and returns a scalar.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from edgeexit.runtime.errors import ConfigError

LossFn = Callable[[Sequence[tuple[torch.Tensor, ...]], torch.Tensor, torch.Tensor, Sequence[float], float], torch.Tensor]
LOSSES: dict[str, LossFn] = {}
EPS = 1e-7


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    """Decorator adding a loss function to LOSSES."""

    def add(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        return fn

    return add


def _cascade_terms(exit_outputs, final_logits, costs):
    """EENets' recursive mixtures from the last exit back: (combined probs, combined cost) per exit.

    P_i = h_i * p_i + (1 - h_i) * P_{i+1}, C_i = h_i * c_i + (1 - h_i) * C_{i+1},
    starting from the final classifier (P_N = softmax(final), C_N = 1).
    """
    probs = F.softmax(final_logits, dim=1)
    cost = torch.full_like(probs[:, :1], float(costs[-1]))
    terms = [(probs, cost)]
    for (logits, confidence), exit_cost in zip(reversed(exit_outputs), reversed(costs[:-1])):
        probs = confidence * F.softmax(logits, dim=1) + (1 - confidence) * probs
        cost = confidence * exit_cost + (1 - confidence) * cost
        terms.append((probs, cost))
    return terms[::-1]


def _nll(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.nll_loss(torch.log(probs.clamp_min(EPS)), target)


@register_loss("v1")
def eenet_v1(exit_outputs, final_logits, target, costs, lam):
    """EENets L_v1 = CE(P_0) + lambda * mean(C_0) on the full mixture only.

    Once an early confidence saturates near 1, every later term is multiplied by ~0: those
    exits (and the final classifier) get no gradient and become dead exits.
    """
    probs, cost = _cascade_terms(exit_outputs, final_logits, costs)[0]
    return _nll(probs, target) + lam * cost.mean()


@register_loss("v2")
def eenet_v2(exit_outputs, final_logits, target, costs, lam):
    """EENets L_v2 = sum over i = 0..N of CE(P_i) + lambda * mean(C_i) (eenets.pytorch loss_v2).

    Each exit's mixture of itself and what follows is trained as if it were the first, so
    later exits and the final classifier keep their own gradient: no dead exits.
    """
    return sum(_nll(probs, target) + lam * cost.mean() for probs, cost in _cascade_terms(exit_outputs, final_logits, costs))


def get_loss(name: str) -> LossFn:
    """Look up a loss by name, with an error listing the valid names."""
    if name not in LOSSES:
        raise ConfigError(f"unknown loss '{name}'; choose from: {', '.join(LOSSES)}")
    return LOSSES[name]
