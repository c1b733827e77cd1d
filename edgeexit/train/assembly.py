"""Model assembly: a backbone, its exit cut points (explicit or placed by a scheme) and the method's
exit heads and policy, put together into an untrained EarlyExitModel."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from edgeexit.errors import ConfigError
from edgeexit.train.backbones import create_backbone, resolve_backbone
from edgeexit.train.config import ModelConfig
from edgeexit.train.cuts import CutGraph, CutPoint
from edgeexit.train.data import DataSplits
from edgeexit.train.methods import get_method
from edgeexit.train.models import EarlyExitModel
from edgeexit.train.placement import place_exits
from edgeexit.train.pretrained import load_backbone_weights


def choose_cuts(
    backbone: torch.nn.Module, input_shape: Sequence[int], placement: str, num_exits: int, exit_at: Sequence[str] | None,
    measure: Callable[[CutGraph], list[CutPoint]] | None = None, num_classes: int | None = None,
) -> list[str]:
    """Cut names: explicit `exit_at`, or picked by a placement scheme on the cumulative MACs curve, or on the
    candidates `measure` returns (the export side's measured latency: export.cut_latency.measured_candidates)."""
    graph = CutGraph(backbone, input_shape)
    if num_classes is not None:
        graph.check_logits(num_classes)
    if exit_at:
        return [graph.resolve(name).name for name in exit_at]
    candidates = graph.candidates
    if measure is not None:
        was_training = backbone.training  # exporting the prefixes puts the backbone in eval mode
        candidates = measure(graph)
        backbone.train(was_training)
    return [point.name for point in place_exits(placement, num_exits, candidates)]


def build_model(
    data: DataSplits,
    backbone: str,
    exit_type: str,
    placement: str,
    num_exits: int,
    exit_at: Sequence[str] | None = None,
    method: str = "eenet",
    threshold: float | None = None,
    backbone_args: dict | None = None,
    exit_args: dict | None = None,
    weights: str | None = None,
    policy_args: dict | None = None,
    measure_cuts: Callable[[CutGraph], list[CutPoint]] | None = None,
) -> EarlyExitModel:
    """Construct an untrained exit-augmented model sized for `data`, its backbone loaded from `weights` if given."""
    spec = get_method(method)
    info = data.info
    resolved = resolve_backbone(backbone)
    net = create_backbone(resolved, backbone, info.num_classes, info.input_shape[0], **(backbone_args or {}))
    if weights:
        load_backbone_weights(net, weights, backbone)
    cuts = choose_cuts(net, info.input_shape, placement, num_exits, exit_at, measure_cuts, info.num_classes)
    config = ModelConfig(
        backbone=backbone,
        backbone_args=backbone_args or {},
        backbone_source=resolved.source,
        method=method,
        exit_type=exit_type,
        exit_args=exit_args or {},
        cuts=cuts,
        num_classes=info.num_classes,
        input_shape=info.input_shape,
        mean=info.mean,
        std=info.std,
        class_names=info.class_names,
        policy=(spec.policy if threshold is None else spec.policy.with_threshold(threshold)).with_args(policy_args),
        frozen_backbone=spec.frozen_backbone,
    )
    model = EarlyExitModel(config, backbone=net)
    built = [config.exit_policy(k).build() for k in range(len(cuts))]  # bad args (e.g. --beta on confidence) fail here
    missing = set(built[0].roles) - set(model.exits[0].outputs)
    if missing:
        raise ConfigError(f"exit type '{exit_type}' lacks the outputs {sorted(missing)} that method '{method}' needs")
    return model
