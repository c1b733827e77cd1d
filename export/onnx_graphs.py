"""PyTorch modules -> simplified ONNX graphs with a symbolic batch dimension."""
from __future__ import annotations

import io
import warnings
from contextlib import redirect_stdout
from pathlib import Path
from typing import Sequence

import onnx
import torch
from torch import nn

from edgeexit.errors import VerificationError
from edgeexit.export.defaults import DEFAULT_OPSET
from edgeexit.runtime.manifest import BATCH_DIM, TensorSpec


class FusedStage(nn.Module):
    """One early stage as a single graph: backbone segment, then its exit head on the features."""

    def __init__(self, segment: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.segment = segment
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.segment(x)
        return (features, *self.head(features))


class SingleOutput(nn.Module):
    """Wraps a module whose output is one tensor so every graph is exported the same way."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def _name_batch_dims(model: onnx.ModelProto) -> None:
    """Give the first dim of every graph input and output the one symbolic name 'batch'."""
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = BATCH_DIM


def pool_globally(model: onnx.ModelProto) -> int:
    """Rewrite each mean over H and W of a 4-D tensor (ReduceMean, keepdims) as GlobalAveragePool, in place; returns the count.

    The same values, but onnxruntime runs GlobalAveragePool on its blocked NCHWc layout, where ReduceMean
    first reorders the features back to NCHW: at batch 1 an exit head's pooling took about 5 us as
    ReduceMean and 2.5 us as GlobalAveragePool, which at resnet20's 0.55 ms is half a percent per exit.
    """
    constants = {init.name: init for init in model.graph.initializer}
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
             if v.type.tensor_type.HasField("shape")}
    axes_inputs, count = set(), 0
    for node in model.graph.node:
        if node.op_type != "ReduceMean" or ranks.get(node.input[0]) != 4:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        axes = attrs.get("axes") if len(node.input) < 2 else (onnx.numpy_helper.to_array(constants[node.input[1]]) if node.input[1] in constants else None)
        if axes is None or sorted(int(a) % 4 for a in axes) != [2, 3] or attrs.get("keepdims", 1) != 1:
            continue
        axes_inputs.update(node.input[1:])
        count += 1
        node.op_type = "GlobalAveragePool"
        del node.input[1:]
        del node.attribute[:]
    unread = axes_inputs - {name for node in model.graph.node for name in node.input}
    kept = [init for init in model.graph.initializer if init.name not in unread]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return count


# ops whose outputs are random draws (and Dropout unless its training_mode is a constant false): in an exported
# graph, train-mode code (dropout, stochastic depth) that would make every run give other outputs
RANDOM_OPS = frozenset({"RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Bernoulli", "Multinomial"})


def refuse_random_ops(model: onnx.ModelProto, name: str) -> None:
    """VerificationError if the graph draws random numbers: its outputs would change from run to run, and a
    parity check on small outputs (absolute below 1) could miss it."""
    constants = {init.name: init for init in model.graph.initializer}

    def draws(node: onnx.NodeProto) -> bool:
        if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
            mode = constants.get(node.input[2])
            return mode is None or bool(onnx.numpy_helper.to_array(mode))
        return node.op_type in RANDOM_OPS

    drawn = sorted({node.op_type for node in model.graph.node if draws(node)})
    if drawn:
        raise VerificationError(f"{name} draws random numbers ({', '.join(drawn)}): the module ran train-mode code "
                                f"(dropout, stochastic depth) when it was exported")


# one-row Gemm, batch 1, 1 thread, model of that Gemm alone: 256 inputs 4.7 us as x W^T, 5.0 us as W x^T
# and Transpose; 1,024 inputs 5.5 vs 5.1; 4,096 inputs 8.3 vs 5.3
BY_ROWS_MIN_INPUTS = 1024


def one_output_gemms_by_rows(model: onnx.ModelProto) -> int:
    """Rewrite each Gemm y = x W^T + b whose constant W has one row (a confidence branch) as y = (W x^T + b)^T, in place.

    The same values, computed another way round: onnxruntime pads a Gemm's N to 16 columns, so with N = 1
    it reads 16 times the weights. A plain exit's confidence branch on resnet20 (16,384 inputs) took 39 us
    at batch 1, 1 thread, as x W^T and 7 us as W x^T. Only for W of at least BY_ROWS_MIN_INPUTS columns:
    below that the extra Transpose costs more than it saves.
    """
    constants = {init.name: init for init in model.graph.initializer}
    nodes, count = [], 0
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        weight = constants.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        if (weight is None or len(weight.dims) != 2 or weight.dims[0] != 1 or weight.dims[1] < BY_ROWS_MIN_INPUTS
                or attrs.get("transB", 0) != 1 or attrs.get("transA", 0) != 0):
            nodes.append(node)
            continue
        rows = f"{node.output[0]}/by_rows"
        swapped = onnx.helper.make_node("Gemm", [node.input[1], node.input[0], *node.input[2:]], [rows], name=f"{node.name}/by_rows",
                                        transB=1, alpha=attrs.get("alpha", 1.0), beta=attrs.get("beta", 1.0))
        nodes += [swapped, onnx.helper.make_node("Transpose", [rows], [node.output[0]], name=f"{node.name}/transpose", perm=[1, 0])]
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return count


def export_graph(
    module: nn.Module,
    example: torch.Tensor,
    path: Path,
    input_name: str,
    output_names: Sequence[str],
    opset: int = DEFAULT_OPSET,
    simplify: bool = True,
) -> onnx.ModelProto:
    """Export `module` with torch.onnx's dynamo exporter, simplify with onnxsim, check, save."""
    module = module.eval()
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (example,),
            None,
            input_names=[input_name],
            output_names=list(output_names),
            dynamic_shapes={"x": {0: batch}},
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    model = program.model_proto
    if simplify:
        import onnxsim

        simplified, ok = onnxsim.simplify(model)
        if not ok:
            raise VerificationError(f"onnxsim could not validate the simplified graph for {path.name}")
        model = simplified
    refuse_random_ops(model, path.name)
    pool_globally(model)
    one_output_gemms_by_rows(model)
    _name_batch_dims(model)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return model


def graph_io(model: onnx.ModelProto) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Names and shapes of a graph's inputs and outputs, as manifest records."""

    def describe(values) -> tuple[TensorSpec, ...]:
        return tuple(
            TensorSpec(value.name, tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in value.type.tensor_type.shape.dim))
            for value in values
        )

    return describe(model.graph.input), describe(model.graph.output)
