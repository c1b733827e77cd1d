"""Backbone registry: every entry builds, traces and has cut points; ResNets and EENet-8 as the papers define them."""
import functools

import pytest
import torch

from edgeexit.train.backbones import BACKBONES, build_backbone
from edgeexit.train.config import ModelConfig
from edgeexit.train.cuts import CutGraph
from edgeexit.train.macs import count_params
from edgeexit.train.models import EarlyExitModel
from edgeexit.errors import ConfigError


@functools.cache
def traced(name: str) -> tuple[torch.nn.Module, CutGraph]:
    """A registered backbone (7 classes, 1 channel) and its cut graph at 16x16, built once per test run."""
    net = build_backbone(name, num_classes=7, in_channels=1).eval()
    return net, CutGraph(net, (1, 16, 16))


@pytest.mark.parametrize("name", [n for n in BACKBONES.names() if ":" not in n])  # not the NAME:ARG sources
def test_every_registered_backbone_builds_traces_and_has_cut_points(name):
    net, graph = traced(name)
    with torch.no_grad():
        assert net(torch.zeros(2, 1, 16, 16)).shape == (2, 7)
    assert graph.candidates
    fractions = [p.fraction for p in graph.candidates]
    assert all(0 < a < b < 1 for a, b in zip(fractions, fractions[1:]))
    assert all(len(p.shape) == 3 for p in graph.candidates)


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_cifar_resnets_are_6n_plus_2_with_an_exit_point_after_each_block(depth):
    blocks = (depth - 2) // 6
    net, graph = traced(f"resnet{depth}")
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert len(convs) + len(linears) == depth
    names = [p.name for p in graph.candidates]
    every_block = [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(blocks)]
    assert names == ["relu", *every_block[:-1]]  # the last block feeds the classifier directly


def test_eenet8_matches_the_papers_parameter_counts_and_exit_points():
    """Paper / authors' code, 2 filters: 137 and 407 parameters up to the two exits, 1,490 in all."""
    net = build_backbone("eenet8", 10, 1)
    assert count_params(net) == 1402
    weight_layers = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and
                     getattr(m, "kernel_size", (3, 3)) != (1, 1)]
    assert len(weight_layers) == 8
    assert [p.name for p in CutGraph(net, (1, 28, 28)).candidates] == ["relu", "block1", "block2"]
    config = ModelConfig(backbone="eenet8", exit_type="pool", cuts=["block1", "block2"], input_shape=(1, 28, 28))
    model = EarlyExitModel(config, backbone=net)
    assert count_params(model) == 1490
    assert count_params(model.segments[0]) + count_params(model.exits[0]) == 137
    assert sum(count_params(m) for m in (*model.segments[:2], model.exits[1])) == 407


def test_eenet8_width_is_the_papers_filters_option():
    four = build_backbone("eenet8", 10, 1, width=4)
    assert four.fc.in_features == 16
    assert count_params(four) > count_params(build_backbone("eenet8", 10, 1))


def test_unknown_backbone_and_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="unknown backbone 'eenet9'; choose from: .*resnet20.*eenet8"):
        build_backbone("eenet9", 10, 1)
    with pytest.raises(ConfigError, match="bad arguments for backbone 'eenet8'"):
        build_backbone("eenet8", 10, 1, depth=3)
