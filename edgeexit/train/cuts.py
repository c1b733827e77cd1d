"""Cut points: trace a backbone with torch.fx, find single-tensor boundaries, split it into segments.

A cut is named by the module whose output it is ("layer1.2", "features.7") or by an fx
node name. It is valid only if everything after it needs no tensor from before it but the
cut's own output, so each segment is a graph with exactly one input.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from operator import getitem as _getitem
from typing import Any, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from edgeexit.train.macs import macs_counter
from edgeexit.errors import ConfigError, first_line


_NORMS = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)  # timm's BatchNormAct2d and LayerNorm2d are subclasses
_NORM_OR_ACT = (*_NORMS, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.LeakyReLU)
# the same layers as aten ops (torch.export programs), matched by op name
_ATEN_CONV_OR_NORM = ("conv", "batch_norm", "layer_norm", "group_norm")
_ATEN_NORM_OR_ACT = ("batch_norm", "layer_norm", "group_norm", "relu", "hardtanh", "silu", "hardswish", "gelu", "leaky_relu")


def _trace_hints() -> tuple[tuple[type, ...], tuple[Any, ...]]:
    """Module types fx must keep as leaves and functions it must not trace into: timm's own lists, when timm is loaded."""
    timm_layers = sys.modules.get("timm.layers")
    if timm_layers is None or not hasattr(timm_layers, "get_notrace_modules"):
        return (), ()
    return tuple(timm_layers.get_notrace_modules()), tuple(timm_layers.get_notrace_functions())


class _PathTracer(fx.Tracer):
    """fx tracer that records, on each node, the qualified name of the module it ran in.

    `leaves` are module types kept as one call (timm's attention blocks with data-dependent
    control flow); `failed_in` names the innermost module where tracing stopped.
    """

    def __init__(self, leaves: tuple[type, ...] = (), autowrap: tuple[Any, ...] = ()) -> None:
        super().__init__(autowrap_functions=autowrap)
        self._path = ""
        self._leaves = leaves
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self._leaves) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        outer, self._path = self._path, self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = f"'{self._path}' ({type(m).__name__})"
            raise
        finally:
            self._path = outer

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        node.meta["module_path"] = self._path
        return node


def _trace(backbone: nn.Module, training: bool) -> fx.GraphModule:
    """`backbone`'s code traced in train or eval mode. fx fixes a forward's Python branches on `self.training`
    (functional dropout, stochastic depth, drop path) when it traces, so each mode has its own graph."""
    tracer = _PathTracer(*_trace_hints())
    was_training = backbone.training
    backbone.train(training)
    try:
        return fx.GraphModule(backbone, tracer.trace(backbone))
    except Exception as exc:  # fx raises many error types for untraceable code
        where = f" in module {tracer.failed_in}" if tracer.failed_in else ""
        raise ConfigError(f"backbone {type(backbone).__name__} cannot be traced by torch.fx{where}: {first_line(exc)}") from None
    finally:
        backbone.train(was_training)


def _module_path(node: fx.Node) -> str:
    """The module a node ran in: recorded by _PathTracer, or a torch.export program's nn_module_stack."""
    if "module_path" in node.meta:
        return node.meta["module_path"]
    stack = node.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0]
    return node.target if node.op == "call_module" else ""


class _MacsShapeProp(ShapeProp):
    """ShapeProp that also records the cumulative MACs (flop counter) after each node."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta["cumulative_macs"] = self.counter.get_total_flops() // 2
        return result

    def propagate(self, *args: Any) -> Any:
        with macs_counter() as self.counter:
            return super().propagate(*args)


@dataclass(frozen=True)
class CutPoint:
    """A candidate cut: its name, fx node, feature shape and backbone MACs up to it."""

    name: str
    node: str
    shape: tuple[int, ...]
    cumulative_macs: int
    fraction: float


def _in_module(node: fx.Node, module: str) -> bool:
    path = _module_path(node)
    return path == module or path.startswith(module + ".")


class _Trace:
    """One fx graph of the backbone: its nodes in order, what crosses a node, and the segments between nodes."""

    def __init__(self, module: fx.GraphModule) -> None:
        self.module = module
        self.nodes = list(module.graph.nodes)
        self.position = {node.name: i for i, node in enumerate(self.nodes)}

    def crossing(self, node: fx.Node) -> list[str]:
        """Names of tensors from before `node` (other than node) that later nodes still need."""
        cut = self.position[node.name]
        needed = []
        for earlier in self.nodes[: cut + 1]:
            if earlier is node or earlier.op == "get_attr":
                continue
            if any(self.position[user.name] > cut for user in earlier.users):
                needed.append(earlier.name)
        return needed

    def last_in(self, module: str) -> fx.Node | None:
        """The last node that runs in `module`: its output."""
        return next((n for n in reversed(self.nodes) if _in_module(n, module)), None)

    def segment(self, start: fx.Node | None, stop: fx.Node | None) -> fx.GraphModule:
        """The graph from after `start` (None: the input) to `stop` (None: the output), reading `start`'s tensor."""
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        first = 0 if start is None else self.position[start.name] + 1
        last = len(self.nodes) - 1 if stop is None else self.position[stop.name]
        if start is not None:
            env[start] = graph.placeholder("x")

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


class CutGraph:
    """A traced backbone with its candidate cut points, ready to be split into segments.

    The cut points, shapes and MACs are those of the backbone's eval-mode code (what export writes);
    `split(..., training=True)` cuts its train-mode code at the same module outputs, for training.
    """

    def __init__(self, backbone: nn.Module, input_shape: Sequence[int], max_depth: int = 2) -> None:
        self.backbone = backbone
        self.input_shape = tuple(input_shape)
        name = type(backbone).__name__
        # a torch.export program is already one graph: it is cut as it is
        self.module = backbone if isinstance(backbone, fx.GraphModule) else _trace(backbone, training=False)
        self._eval = _Trace(self.module)
        self._train: _Trace | None = None  # traced when first needed (split(..., training=True))
        was_training = backbone.training
        backbone.eval()
        try:
            with torch.no_grad():
                _MacsShapeProp(self.module).propagate(torch.zeros(1, *self.input_shape))
        except Exception as exc:  # whatever the backbone's own code raises on this input
            raise ConfigError(f"backbone {name} fails on a {'x'.join(map(str, self.input_shape))} input: "
                              f"{type(exc).__name__}: {first_line(exc)}") from None
        finally:
            backbone.train(was_training)
        self.nodes = self._eval.nodes
        self._position = self._eval.position
        self.full_macs = max(self.nodes[-1].meta["cumulative_macs"], 1)
        self.output_shape = self._output_shape()
        self.candidates = self._find_candidates(max_depth)

    def _output_shape(self) -> tuple[int, ...] | None:
        """Per-sample shape of the backbone's output (its logits), or None when it is not one tensor."""
        out = self.nodes[-1].args[0]
        meta = out.meta.get("tensor_meta") if isinstance(out, fx.Node) else None
        return tuple(int(d) for d in meta.shape[1:]) if hasattr(meta, "shape") else None

    def check_logits(self, num_classes: int) -> None:
        """ConfigError unless the backbone outputs one logits vector of `num_classes` per input (a factory may ignore it)."""
        if self.output_shape != (num_classes,):
            raise ConfigError(f"backbone {type(self.backbone).__name__} outputs shape {self.output_shape} per input; "
                              f"the data has {num_classes} classes (a logits vector of that size is needed)")

    def _is_boundary(self, node: fx.Node) -> bool:
        return not self.crossing(node)

    def crossing(self, node: fx.Node) -> list[str]:
        """Names of tensors from before `node` (other than node) that later nodes still need."""
        return self._eval.crossing(node)

    def _feature_shape(self, node: fx.Node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape") or len(meta.shape) != 4:
            return None
        return tuple(int(d) for d in meta.shape[1:])

    def _find_candidates(self, max_depth: int) -> list[CutPoint]:
        ends: dict[str, str] = {}
        paths = {_module_path(n) for n in self.nodes}  # a program's graph keeps no parameter-free modules (relu, pools)
        names = {name for name, _ in self.backbone.named_modules()}
        names |= {".".join(p.split(".")[: i + 1]) for p in paths if p for i in range(p.count(".") + 1)}
        for name in sorted(names, key=lambda n: n.count(".")):
            if not name or name.count(".") >= max_depth:
                continue
            last = self._eval.last_in(name)
            if last is not None:
                ends[last.name] = name  # deeper modules come later and win: "layer1.2" over "layer1"
        output_pos = len(self.nodes) - 1
        points = []
        for node in self.nodes:
            if node.name not in ends or self._position[node.name] >= output_pos - 1:
                continue
            shape = self._feature_shape(node)
            if shape is None or shape[1:] == (1, 1) or self._mid_layer(node) or not self._is_boundary(node):
                continue
            macs = node.meta["cumulative_macs"]
            if macs >= self.full_macs * 0.99:
                continue
            points.append(CutPoint(ends[node.name], node.name, shape, macs, macs / self.full_macs))
        return points

    def _mid_layer(self, node: fx.Node) -> bool:
        """True inside a conv-bn-act run: a conv or norm output whose only user normalizes or activates it.

        A block output feeding the next block's norm (DenseNet's dense block before its
        transition) is not mid-layer: it is a real boundary.
        """
        if not self._is_layer(node, (nn.Conv2d, *_NORMS), _ATEN_CONV_OR_NORM):
            return False
        users = [u for n in node.users for u in (n.users if n.target is _getitem else (n,))]  # through aten tuple outputs
        return len(users) == 1 and self._is_layer(users[0], _NORM_OR_ACT, _ATEN_NORM_OR_ACT)

    def _is_layer(self, node: fx.Node, modules: tuple[type, ...], aten_names: tuple[str, ...]) -> bool:
        """Whether `node` calls one of `modules`, or (torch.export graphs) an aten op named like one of `aten_names`."""
        if node.op == "call_module":
            return isinstance(self.module.get_submodule(node.target), modules)
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            op = node.target.name().split("::")[-1]
            return any(name in op for name in aten_names)
        return False

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

    def split(self, cut_names: Sequence[str], training: bool = False) -> list[fx.GraphModule]:
        """Segments of the backbone between consecutive cuts; the last one ends at the logits. Of its eval-mode code,
        or with `training` of its train-mode code (dropout and stochastic depth drawing), cut at the same modules."""
        points = [self.resolve(name) for name in cut_names]
        positions = [self._position[p.node] for p in points]
        if positions != sorted(set(positions)):
            raise ConfigError(f"cut points must be distinct and in network order, got {', '.join(cut_names)}")
        trace = self._training_trace() if training else self._eval
        nodes = [self.nodes[i] for i in positions] if trace is self._eval else [self._training_cut(p) for p in points]
        bounds = [None, *nodes, None]
        return [trace.segment(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]

    def _training_trace(self) -> _Trace:
        """The backbone's train-mode graph, or the eval-mode one when its code does not depend on the mode."""
        if self._train is None:
            same = isinstance(self.backbone, fx.GraphModule)  # a torch.export program has one graph
            train = self._eval if same else _Trace(_trace(self.backbone, training=True))
            self._train = self._eval if train.module.code == self.module.code else train
        return self._train

    def _training_cut(self, point: CutPoint) -> fx.Node:
        """The output of the cut's module in the train-mode graph; ConfigError unless it is a boundary there too."""
        node = self._training_trace().last_in(point.name)
        if node is None or self._training_trace().crossing(node):
            raise ConfigError(f"cut '{point.name}' is a single-tensor boundary of the backbone in eval mode "
                              f"but not in train mode; choose another cut point")
        return node

