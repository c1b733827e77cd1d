"""The whole cascade as one ONNX graph (cascade.onnx): stage graphs nested under If nodes, exit policies as ONNX ops.

Layout, for stage k of a batch of n inputs (level 0 is the top graph, level k+1 lives in level k's If):

    stage k's nodes -> features_k, exit outputs -> policy -> exits (n,), prediction (n,), scores (n, C)
    idx = NonZero(not exits)                      # the survivors
    If Size(idx) > 0:  Gather(features_k, idx) -> level k+1 -> ScatterND its results into level k's
    else:              level k's results as they are

A stage that reads the input (each whole model of a model cascade) reads the graph input's rows of the
inputs still in: the compacting graph gathers those rows at each exit while a later stage reads them.

So each input leaves at its first accepted exit for any batch size, with one session run and no
Loop: survivors are compacted as the stage chain compacts them. Why not the alternatives: a Loop
over the batch with per-input Ifs runs every stage at batch 1 (at batch 64 that gives up batched
convolutions: the chain measured 0.53 of full.onnx at exit 0, a per-input loop cannot beat 64
batch-1 runs), and an If-only graph (no compaction) is correct at batch 1 only, so larger
batches would need a second graph or the chain. Compaction costs, per early exit on the
no-exit path, one Gather of the features and three ScatterND of a few bytes; at batch 1 the
stage weights must live inside their own subgraph (see _inline_stage). Measured by
benchmarks/one_graph.py (interleaved with full.onnx and the stage chain).

The batch-1 graph (compact=False; export writes it as cascade_b1.onnx, which `run` uses for one input per call,
and `static-batch --batch 1` as cascade.onnx) is leaner: If(exits) leaves
through its then-branch, which alone computes what only a leaving input needs (with a confidence
policy: the exit's class head, the ArgMax, the exit index), and goes on through its else-branch. Per-exit
scalars (thresholds and their logits, temperatures, beta) are computed once, in a prelude at the top.
At batch 1 every small op on the path costs about a microsecond. benchmarks/one_graph.py, 1 thread,
no exit, this layout against the previous one (an If on Not(exits), every exit output computed
eagerly, scalars per level): resnet56 with plain exits 1.030 vs 1.118 of full.onnx, resnet20 plain
1.083 vs 1.418 (the class head over the whole feature map now runs only on leaving), resnet20 pool
1.054-1.081 vs 1.105, resnet56 pool 1.030 vs 1.032. Of resnet56's 1.030, 1.014 is the stage
boundaries alone (each If input leaves onnxruntime's blocked NCHWc layout and re-enters it inside
the branch).

Each exit's ops are its policy's ONNX half (edgeexit.runtime.policies holds each policy's numpy
rule and ONNX builder side by side; this module gives them a GraphOps, _Ops): the same comparisons
in the same precision (float64 for the confidence logit, max-softmax, entropy, ensembles and the
sigmoid of the class-exclusion logits), ArgMax taking the first of equal maxima as numpy does. The
per-exit float64 vectors (thresholds; beta for class exclusion; temperature for max-softmax and
entropy; weights for an ensemble at deferral) are constants holding the manifest's values, so a
bare session (C/C++, Node, Python) takes the image alone and loads without warnings
(initializers that are also graph inputs make onnxruntime warn at every load). To tune them per call, edgeexit's runtime and the web page run a copy with
those constants moved into graph inputs (edgeexit.runtime.cascade_bytes.tunable_cascade_bytes).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeexit.runtime.cascade import CascadeRunner, manifest_policies
from edgeexit.runtime.graph import GraphRunner
from edgeexit.runtime.manifest import (
    BATCH_DIM,
    CASCADE_B1_NAME,
    CASCADE_NAME,
    CASCADE_OUTPUTS,
    VECTORS_CONSTANT,
    CascadeGraph,
    Manifest,
    load_manifest,
)
from edgeexit.runtime.bundle import save_manifest
from edgeexit.runtime.files import sha256_file
from edgeexit.runtime.policies import GRAPH_VECTORS, Policy, graph_vectors
from edgeexit.runtime.verify import check_graph_decisions

CHECK_INPUTS = 128  # inputs on which a rebuilt cascade.onnx must make the chain's decisions (whole batch and one by one)

OUT_SCORES, OUT_PREDICTION, OUT_EXIT = CASCADE_OUTPUTS


class _Graph:
    """Node and name bookkeeping for one cascade graph; every stage's tensors get the prefix s{k}/."""

    def __init__(self, opset: int, compact: bool, num_exits: int) -> None:
        self.initializers: list[onnx.TensorProto] = []
        self.num_exits = num_exits
        self.prelude: list[onnx.NodeProto] = []  # top-level nodes that run once per call (per-exit scalars)
        self.opset = opset
        self.compact = compact
        self._count = 0
        self._scalars: dict[tuple, list[str]] = {}

    def fresh(self, base: str) -> str:
        self._count += 1
        return f"cascade/{base}_{self._count}"

    def const(self, base: str, value: np.ndarray) -> str:
        """A top-level initializer (subgraphs see it through the outer scope)."""
        name = self.fresh(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, nodes: list, op: str, inputs: list[str], base: str, outputs: int = 1, **attrs) -> str | list[str]:
        names = [self.fresh(base) for _ in range(outputs)]
        nodes.append(helper.make_node(op, inputs, names, name=names[0], **attrs))
        return names[0] if outputs == 1 else names


def _inline_stage(model: onnx.ModelProto, index: int, input_name: str) -> tuple[list, list, dict[str, str]]:
    """Stage `index`'s nodes and initializers renamed under s{index}/, reading `input_name`.

    The initializers stay in the (sub)graph that uses them: onnxruntime pre-packs and fuses the
    weights of a subgraph's own initializers only (measured: with the weights top-level, a stage
    inside an If ran about 3x slower at batch 1)."""
    prefix = f"s{index}/"
    rename = {model.graph.input[0].name: input_name, "": ""}

    def mapped(name: str) -> str:
        return rename.setdefault(name, prefix + name)

    initializers = []
    for init in model.graph.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(init)
        copy.name = mapped(init.name)
        initializers.append(copy)
    nodes = []
    for node in model.graph.node:
        if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for attr in node.attribute):
            raise ValueError(f"stage_{index}.onnx has a control-flow node ({node.op_type}); cascade.onnx cannot inline it")
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = prefix + (node.name or f"node{len(nodes)}")
        copy.input[:] = [mapped(n) for n in node.input]
        copy.output[:] = [mapped(n) for n in node.output]
        nodes.append(copy)
    outputs = {out.name: mapped(out.name) for out in model.graph.output}
    return nodes, initializers, outputs


class _Ops:
    """The GraphOps a policy builds its ONNX rule through (edgeexit.runtime.policies): nodes go into one node list."""

    def __init__(self, graph: _Graph, nodes: list) -> None:
        self.graph = graph
        self.nodes = nodes
        self.compact = graph.compact

    def node(self, op: str, inputs: list[str], base: str, **attrs) -> str:
        return self.graph.node(self.nodes, op, inputs, base, **attrs)

    def const(self, base: str, value: np.ndarray) -> str:
        return self.graph.const(base, value)

    def cast(self, x: str, dtype: str) -> str:
        return self.node("Cast", [x], f"{dtype}", to=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))

    def reduce(self, op: str, x: str, base: str) -> str:
        """Reduce over the class axis (1), keepdims 0; axes became an input of ReduceMax in opset 18 (of ReduceSum in 13)."""
        if self.graph.opset >= (13 if op == "ReduceSum" else 18):
            return self.node(op, [x, self.const("axis", np.array([1], dtype=np.int64))], base, keepdims=0)
        return self.node(op, [x], base, axes=[1], keepdims=0)

    def argmax(self, x: str) -> str:
        return self.node("ArgMax", [x], "argmax", axis=1, keepdims=0, select_last_index=0)

    def flat(self, column: str) -> str:
        """An (n, 1) column as an (n,) vector; the batch-1 graph keeps the (1, 1) column (If takes any one-element condition)."""
        return self.node("Reshape", [column, self.const("flat", np.array([-1], dtype=np.int64))], "flat") if self.compact else column

    def per_exit(self, vector: str, index: int, transform: Callable | None = None) -> str:
        """Element `index` (shape [1]) of a per-exit vector, optionally transformed.

        The whole vector is transformed and split once per call in the top-level prelude, so a stage's path
        holds no scalar arithmetic (see the module docstring for what small ops cost at batch 1)."""
        graph = self.graph
        key = (vector, transform)
        if key not in graph._scalars:
            prelude = _Ops(graph, graph.prelude)
            value = vector if transform is None else transform(prelude, vector)
            count = graph.num_exits
            if graph.opset >= 13:
                parts = graph.node(graph.prelude, "Split", [value, graph.const("sizes", np.ones(count, dtype=np.int64))], "exit", outputs=count, axis=0)
            else:
                parts = graph.node(graph.prelude, "Split", [value], "exit", outputs=count, axis=0, split=[1] * count)
            graph._scalars[key] = [parts] if count == 1 else parts
        return graph._scalars[key][index]


def _split_lazy(nodes: list, needed: list[str]) -> tuple[list, list]:
    """(the nodes that `needed` depends on, the rest), each in order. At batch 1 the rest (such as the exit's
    class head when the decision reads only its confidence) moves into the exit's branch and runs only
    for an input that leaves there."""
    producer = {out: node for node in nodes for out in node.output}
    keep: set[int] = set()
    stack = list(needed)
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in keep:
            keep.add(id(node))
            stack.extend(node.input)
    return [n for n in nodes if id(n) in keep], [n for n in nodes if id(n) not in keep]


def _split_initializers(initializers: list, now: list, later: list) -> tuple[list, list]:
    """(initializers the `now` nodes read, those only `later` nodes read): a branch owns its weights (see _inline_stage)."""
    read_now = {name for node in now for name in node.input}
    read_later = {name for node in later for name in node.input} - read_now
    return [init for init in initializers if init.name not in read_later], [init for init in initializers if init.name in read_later]


def _branch(graph: _Graph, nodes: list, initializers: list, results: list[str], types: list[int]) -> onnx.GraphProto:
    """An If branch computing `results` with `nodes`; results it does not produce are passed through Identity."""
    made = {out for node in nodes for out in node.output}
    nodes = list(nodes)
    outputs = [name if name in made else graph.node(nodes, "Identity", [name], "same") for name in results]
    return helper.make_graph(nodes, graph.fresh("branch"), [], [helper.make_tensor_value_info(n, t, None) for n, t in zip(outputs, types)],
                             initializer=initializers)


def _level(graph: _Graph, manifest: Manifest, policies: list[Policy], stages: list[onnx.ModelProto], index: int, x: str | None,
           state: str | None, image: str) -> tuple[list, list, list[str]]:
    """Level `index` (stage `index` on `x`, the previous stage's features, or on `image`, the graph input's rows of the
    inputs still in; the rest under an If): nodes, initializers, (scores, prediction, exit).

    Each exit's decision, and the final stage's prediction, are its policy's own ONNX rule (Policy.emit...)."""
    spec = manifest.stages[index]
    nodes, initializers, outputs = _inline_stage(stages[index], index, image if spec.reads_input else x)
    ops = _Ops(graph, nodes)
    names = spec.output_names
    features = None if spec.features is None else outputs[spec.features.name]
    if spec.exit is None:
        logits = outputs[names[0]]
        prediction = policies[-1].emit_final(ops, logits, state, index - 1) if policies else ops.argmax(logits)
        exit_index = graph.node(nodes, "Expand", [graph.const("exit", np.array(index, dtype=np.int64)), graph.node(nodes, "Shape", [prediction], "n")], "exit_index")
        return nodes, initializers, [logits, prediction, exit_index]
    policy = policies[index]
    roles = {role: outputs[name] for role, name in spec.exit.outputs.items()}
    if index == 0:
        state = policy.emit_start(ops, roles)
    exits, prediction, scores, state = policy.emit(ops, roles, index, state)
    exit_index = graph.node(nodes, "Expand", [graph.const("exit", np.array(index, dtype=np.int64)), graph.node(nodes, "Shape", [prediction], "n")], "exit_index")
    types = [TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT64]
    if not graph.compact:  # batch 1: the input leaves here (then) or goes on (else)
        nodes, later = _split_lazy(nodes, [name for name in (features, exits, state) if name])
        initializers, later_inits = _split_initializers(initializers, nodes, later)
        leave = _branch(graph, later, later_inits, [scores, prediction, exit_index], types)
        inner, inner_inits, results = _level(graph, manifest, policies, stages, index + 1, features, state, image)
        go_on = _branch(graph, inner, inner_inits, results, types)
        return nodes, initializers, graph.node(nodes, "If", [exits], "level", outputs=3, then_branch=leave, else_branch=go_on)
    else_graph = _branch(graph, [], [], [scores, prediction, exit_index], types)
    survivors = graph.node(nodes, "NonZero", [graph.node(nodes, "Not", [exits], "stay")], "survivors")
    any_left = graph.node(nodes, "Greater", [graph.node(nodes, "Size", [survivors], "count"), graph.const("zero", np.array(0, dtype=np.int64))], "any_left")

    rows = []
    flat = graph.node(rows, "Reshape", [survivors, graph.const("flat", np.array([-1], dtype=np.int64))], "rows")
    sub_x = None if features is None else graph.node(rows, "Gather", [features, flat], "sub_x", axis=0)
    sub_state = None if state is None else graph.node(rows, "Gather", [state, flat], "sub_state", axis=0)
    image_later = any(stage.reads_input for stage in manifest.stages[index + 1 :])
    sub_image = graph.node(rows, "Gather", [image, flat], "sub_image", axis=0) if image_later else image
    inner, inner_inits, results = _level(graph, manifest, policies, stages, index + 1, sub_x, sub_state, sub_image)
    rows += inner
    at = graph.node(rows, "Transpose", [survivors], "at", perm=[1, 0])
    merged = [graph.node(rows, "ScatterND", [base, at, sub], "merged") for base, sub in zip([scores, prediction, exit_index], results)]
    then_graph = _branch(graph, rows, inner_inits, merged, types)
    results = graph.node(nodes, "If", [any_left], "level", outputs=3, then_branch=then_graph, else_branch=else_graph)
    return nodes, initializers, results


def build_cascade(manifest: Manifest, compact: bool = True) -> onnx.ModelProto:
    """cascade.onnx for a bundle whose stage graphs are in manifest.root.

    compact=False builds the batch-1 graph: no survivor compaction, input and outputs fixed at
    batch 1 (an If per exit only; for runtimes or benchmarks that want the leanest batch-1 graph)."""
    stages = [onnx.load(str(manifest.path(stage.file))) for stage in manifest.stages]
    opset = next(o.version for o in stages[0].opset_import if o.domain in ("", "ai.onnx"))
    graph = _Graph(opset, compact, len(manifest.exits))
    spec = manifest.input_spec
    policies = manifest_policies(manifest)
    nodes, initializers, (scores, prediction, exit_index) = _level(graph, manifest, policies, stages, 0, None, None, spec.name)
    graph.initializers += initializers
    nodes = graph.prelude + nodes
    for name, value in graph_vectors(policies).items():
        graph.initializers.append(numpy_helper.from_array(value, name))
    nodes += [helper.make_node("Identity", [scores], [OUT_SCORES]), helper.make_node("Identity", [prediction], [OUT_PREDICTION]),
              helper.make_node("Identity", [exit_index], [OUT_EXIT])]
    c, h, w = manifest.input_shape
    batch = BATCH_DIM if compact else 1
    inputs = [helper.make_tensor_value_info(spec.name, TensorProto.FLOAT, [batch, c, h, w])]  # the vectors stay constants
    outputs = [
        helper.make_tensor_value_info(OUT_SCORES, TensorProto.FLOAT, [batch, manifest.num_classes]),
        helper.make_tensor_value_info(OUT_PREDICTION, TensorProto.INT64, [batch]),
        helper.make_tensor_value_info(OUT_EXIT, TensorProto.INT64, [batch]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "edgeexit_cascade", inputs, outputs, initializer=graph.initializers),
        opset_imports=list(stages[0].opset_import),
        producer_name="edgeexit",
    )
    model.ir_version = stages[0].ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


def _describe(values) -> list[dict]:
    dtypes = {TensorProto.FLOAT: "float32", TensorProto.DOUBLE: "float64", TensorProto.INT64: "int64"}
    return [{"name": value.name, "shape": [d.dim_param or int(d.dim_value) for d in value.type.tensor_type.shape.dim],
             "dtype": dtypes[value.type.tensor_type.elem_type]} for value in values]


def write_cascade(manifest: Manifest, compact: bool = True, file: str = CASCADE_NAME) -> CascadeGraph:
    """Build cascade.onnx (or `file`) into the bundle folder; return its manifest record (file, sha256, inputs, outputs).

    The record lists the per-exit vectors as inputs after the image, with their defaults, and says that the
    file holds them as constants (the runtime's copy takes them as inputs: cascade_bytes.tunable_cascade_bytes)."""
    model = build_cascade(manifest, compact)
    path = manifest.path(file)
    onnx.save(model, str(path))
    vectors = [{"name": init.name, "shape": [len(manifest.exits)], "dtype": "float64", "default": numpy_helper.to_array(init).tolist()}
               for init in model.graph.initializer if init.name in GRAPH_VECTORS]
    entry = {"file": file, "sha256": sha256_file(path), "inputs": _describe(model.graph.input) + vectors,
             "outputs": _describe(model.graph.output), "vectors": VECTORS_CONSTANT}
    return CascadeGraph.from_dict(entry, manifest.input_spec, len(manifest.exits), file)


def write_cascades(manifest: Manifest) -> Manifest:
    """The manifest with its one-graph cascades (re)built in the bundle folder: cascade.onnx (compacting, any batch)
    and cascade_b1.onnx (the batch-1 graph, what `run` uses for one input per call: the runtime has no onnx package
    to build it, so export writes it). A static batch of 1 gets the batch-1 graph as cascade.onnx and no second
    file; a static batch above 1 neither (compacting survivors needs a symbolic batch): the stage chain runs.
    Files of graphs the bundle no longer has are removed, and a bundle with no exit (a static network) has none."""
    static, exits = manifest.static_batch, bool(manifest.exits)
    cascade = write_cascade(manifest, compact=static is None) if exits and static in (None, 1) else None
    cascade_b1 = write_cascade(manifest, compact=False, file=CASCADE_B1_NAME) if exits and static is None else None
    written = dataclasses.replace(manifest, cascade=cascade, cascade_b1=cascade_b1)
    for stale in {g.file for g in manifest.cascades} - {g.file for g in written.cascades}:
        manifest.path(stale).unlink(missing_ok=True)
    return written


def check_cascades(manifest: Manifest, inputs: dict[str, np.ndarray]) -> dict[str, dict]:
    """Every one-graph cascade of the bundle against the stage chain on `inputs` (runtime.verify.check_graph_decisions);
    the report of cascade.onnx."""
    chain = CascadeRunner(manifest)
    reports = [check_graph_decisions(GraphRunner(manifest, batch_size=1 if graph is manifest.cascade_b1 else None), chain, inputs)
               for graph in manifest.cascades]
    return reports[0]


def rebuild_cascade(bundle: str | os.PathLike, x: np.ndarray) -> Manifest:
    """Write the bundle's one-graph cascades (write_cascades) for its current stage graphs and policies (after
    quantize, static-batch or a calibration that changed the policy), check their decisions against the stage
    chain on x, and save the manifest."""
    manifest = load_manifest(bundle, check_hashes=False)
    try:
        manifest = write_cascades(manifest)
        if manifest.cascades:
            check_cascades(manifest, {"calibration": x[:CHECK_INPUTS]})
    except BaseException:
        for file in (CASCADE_NAME, CASCADE_B1_NAME):
            manifest.path(file).unlink(missing_ok=True)
        raise
    return save_manifest(bundle, manifest)
