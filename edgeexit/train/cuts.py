"""Cut points: trace a backbone with torch.fx, find single-tensor boundaries, split it into segments.

A cut is named by the module whose output it is ("layer1.2", "features.7") or by an fx
node name. It is valid only if everything after it needs no tensor from before it but the
cut's own output, so each segment is a graph with exactly one input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from edgeexit.train.macs import count_macs, layer_macs
from edgeexit.errors import ConfigError, first_line


_NORM_OR_ACT = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.LeakyReLU)


class _PathTracer(fx.Tracer):
    """fx tracer that records, on each node, the qualified name of the module it ran in."""

    def __init__(self) -> None:
        super().__init__()
        self._path = ""

    def call_module(self, m, forward, args, kwargs):
        outer, self._path = self._path, self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self._path = outer

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        node.meta["module_path"] = self._path
        return node


@dataclass(frozen=True)
class CutPoint:
    """A candidate cut: its name, fx node, feature shape and backbone MACs up to it."""

    name: str
    node: str
    shape: tuple[int, ...]
    cumulative_macs: int
    fraction: float


def _in_module(node: fx.Node, module: str) -> bool:
    path = node.meta.get("module_path", "")
    return path == module or path.startswith(module + ".")


class CutGraph:
    """A traced backbone with its candidate cut points, ready to be split into segments."""

    def __init__(self, backbone: nn.Module, input_shape: Sequence[int], max_depth: int = 2) -> None:
        self.backbone = backbone
        self.input_shape = tuple(input_shape)
        try:
            graph = _PathTracer().trace(backbone)
        except Exception as exc:  # fx raises many error types for untraceable code
            raise ConfigError(f"backbone {type(backbone).__name__} cannot be traced by torch.fx: {first_line(exc)}") from None
        self.module = fx.GraphModule(backbone, graph)
        was_training = backbone.training
        backbone.eval()
        with torch.no_grad():
            ShapeProp(self.module).propagate(torch.zeros(1, *self.input_shape))
        backbone.train(was_training)
        self.nodes = list(self.module.graph.nodes)
        self._position = {node.name: i for i, node in enumerate(self.nodes)}
        self.full_macs = count_macs(backbone, self.input_shape)
        self.candidates = self._find_candidates(max_depth)

    def _is_boundary(self, node: fx.Node) -> bool:
        return not self.crossing(node)

    def crossing(self, node: fx.Node) -> list[str]:
        """Names of tensors from before `node` (other than node) that later nodes still need."""
        cut = self._position[node.name]
        needed = []
        for earlier in self.nodes[: cut + 1]:
            if earlier is node or earlier.op == "get_attr":
                continue
            if any(self._position[user.name] > cut for user in earlier.users):
                needed.append(earlier.name)
        return needed

    def _feature_shape(self, node: fx.Node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape") or len(meta.shape) != 4:
            return None
        return tuple(int(d) for d in meta.shape[1:])

    def _find_candidates(self, max_depth: int) -> list[CutPoint]:
        ends: dict[str, str] = {}
        for name, _ in self.backbone.named_modules():
            if not name or name.count(".") >= max_depth:
                continue
            inside = [n for n in self.nodes if _in_module(n, name)]
            if inside:
                ends[inside[-1].name] = name  # deeper modules come later and win: "layer1.2" over "layer1"
        cumulative = self._prefix_macs()
        output_pos = len(self.nodes) - 1
        points = []
        for node in self.nodes:
            if node.name not in ends or self._position[node.name] >= output_pos - 1:
                continue
            shape = self._feature_shape(node)
            if shape is None or shape[1:] == (1, 1) or self._mid_layer(node) or not self._is_boundary(node):
                continue
            macs = cumulative[node.name]
            if macs >= self.full_macs * 0.99:
                continue
            points.append(CutPoint(ends[node.name], node.name, shape, macs, macs / self.full_macs))
        return points

    def _mid_layer(self, node: fx.Node) -> bool:
        """True inside a conv-bn-act run: a conv or norm output whose only user normalizes or activates it.

        A block output feeding the next block's norm (DenseNet's dense block before its
        transition) is not mid-layer: it is a real boundary.
        """
        if node.op != "call_module" or not isinstance(self.module.get_submodule(node.target), (nn.Conv2d, nn.BatchNorm2d)):
            return False
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            return False
        return isinstance(self.module.get_submodule(users[0].target), _NORM_OR_ACT)

    def _prefix_macs(self) -> dict[str, int]:
        """MACs of the backbone up to and including each node (conv and linear layers)."""
        totals, running = {}, 0
        modules = dict(self.module.named_modules())
        for node in self.nodes:
            if node.op == "call_module":
                meta = node.meta.get("tensor_meta")
                if meta is not None and hasattr(meta, "shape"):
                    running += layer_macs(modules[node.target], meta.shape)
            totals[node.name] = running
        return totals

    def resolve(self, name: str) -> CutPoint:
        """The candidate named `name` (module name or fx node name), or a one-line ConfigError."""
        for point in self.candidates:
            if name in (point.name, point.node):
                return point
        node = next((n for n in self.nodes if n.name == name), None)
        if node is None:
            module_nodes = [n for n in self.nodes if _in_module(n, name)]
            node = module_nodes[-1] if module_nodes else None
        if node is not None and not self._is_boundary(node):
            needs = ", ".join(self.crossing(node))
            raise ConfigError(f"cut '{name}' needs more than one tensor: later layers also use {needs}")
        valid = ", ".join(p.name for p in self.candidates)
        raise ConfigError(f"unknown cut point '{name}'; valid cut points: {valid}")

    def split(self, cut_names: Sequence[str]) -> list[fx.GraphModule]:
        """Segments of the backbone between consecutive cuts; the last one ends at the logits."""
        points = [self.resolve(name) for name in cut_names]
        positions = [self._position[p.node] for p in points]
        if positions != sorted(set(positions)):
            raise ConfigError(f"cut points must be distinct and in network order, got {', '.join(cut_names)}")
        bounds = [None, *[p.node for p in points], None]
        return [self._segment(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]

    def _segment(self, start: str | None, stop: str | None) -> fx.GraphModule:
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        first = 0 if start is None else self._position[start] + 1
        last = len(self.nodes) - 1 if stop is None else self._position[stop]
        if start is not None:
            env[self.nodes[self._position[start]]] = graph.placeholder("x")

        def lookup(node: fx.Node) -> fx.Node:
            if node not in env and node.op == "get_attr":
                env[node] = graph.node_copy(node, lookup)
            return env[node]

        for node in self.nodes[first : last + 1]:
            if node.op == "output":
                graph.output(lookup(node.args[0]))
                break
            env[node] = graph.node_copy(node, lookup)
        else:
            graph.output(env[self.nodes[last]])
        graph.lint()
        return fx.GraphModule(self.module, graph)

