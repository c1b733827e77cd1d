"""The bundle format, stated once: typed manifest records, their validation, and loading.

manifest.json is read into frozen dataclasses (Manifest, InputSpec, StageSpec, ExitSpec,
PolicySpec, Calibration, ...): `from_dict` validates and builds each record, naming the first
problem as "invalid manifest: WHERE: WHY"; `to_dict` writes it back. Every module reads
attributes, never raw manifest keys; every write goes through runtime/bundle.py.

Adding a field: give the dataclass a field with a default, read (and check) it in
`from_dict`, write it in `to_dict`; bump FORMAT_VERSION when older readers must refuse it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgeexit.errors import BundleError
from edgeexit.runtime.files import sha256_file
from edgeexit.runtime.policies import NO_ENSEMBLE, Policy, ensemble_choices, get_policy, per_exit_args
from edgeexit.runtime.preprocess import normalize, preprocess
from edgeexit.runtime.profiles import DeviceProfile, read_profiles
from edgeexit.runtime.provenance import ModelInfo, Producer
from edgeexit.runtime.schema import (
    BATCH_DIM, Shape, check_batch_dim, count, invalid, is_batch_size, is_number, require, sha256_of, shape_of,
)

FORMAT = "edgeexit-bundle"
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
FULL_NAME = "full.onnx"
CASCADE_NAME = "cascade.onnx"
CASCADE_B1_NAME = "cascade_b1.onnx"  # the batch-1 graph: no survivor compaction, shapes fixed at 1
CASCADE_OUTPUTS = ("scores", "prediction", "exit_index")
CASCADE_DTYPES = ("float32", "float64", "int64")
# where cascade.onnx stores its per-exit vectors: plain constants (bare sessions take the image alone), or
# initializers that are also graph inputs (bundles written before; onnxruntime warns at load)
VECTORS_CONSTANT, VECTORS_INPUT = "constant", "input"
CASCADE_VECTORS = (VECTORS_CONSTANT, VECTORS_INPUT)
FP32, INT8 = "fp32", "int8"
PRECISIONS = (FP32, INT8)
# what a stage reads: the bundle's input (stage 0; every whole model of a model cascade), or the previous stage's
# features; manifests written before the field: stage 0 the input, the others the features
READS_INPUT, READS_FEATURES = "input", "features"
STAGE_READS = (READS_INPUT, READS_FEATURES)


def stage_file(index: int) -> str:
    """File name of stage `index` inside a bundle."""
    return f"stage_{index}.onnx"


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: its name and shape ("batch", dims...); name None matches any name."""

    name: str | None
    shape: Shape

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "TensorSpec":
        return cls(require(data, "name", str, where), shape_of(require(data, "shape", list, where), f"{where}.shape"))

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape)}


def _tensors(data: Any, where: str) -> tuple[TensorSpec, ...]:
    if not isinstance(data, list) or not data:
        raise invalid(where, "must be a non-empty list of tensors")
    return tuple(TensorSpec.from_dict(tensor, f"{where}[{i}]") for i, tensor in enumerate(data))


@dataclass(frozen=True)
class InputSpec:
    """The bundle's input: one float32 NCHW image batch, its normalization and class names.

    Model-ready inputs are `normalize(images in [0, 1])` at the bundle's size; `preprocess`
    takes images of any size and 1 or 3 channels there (see `resize` for the convention).
    """

    name: str
    shape: Shape
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    dtype: str = "float32"
    layout: str = "NCHW"

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one input sample."""
        return tuple(self.shape[1:])

    @property
    def channels(self) -> int:
        return self.shape[1]

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """(x - mean) / std per channel for float32 NCHW images in [0, 1] already at the input size."""
        return normalize(x, self.mean, self.std)

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """Float (N, C, h, w) images in [0, 1], any size, 1 or 3 channels -> the model-ready batch."""
        return preprocess(images, self.sample_shape, self.mean, self.std)

    @classmethod
    def from_dict(cls, data: dict, num_classes: int) -> "InputSpec":
        name = require(data, "name", str, "input")
        shape = shape_of(require(data, "shape", list, "input"), "input.shape")
        if require(data, "dtype", str, "input") != "float32":
            raise invalid("input.dtype", "only float32 inputs are supported")
        if len(shape) != 4 or require(data, "layout", str, "input") != "NCHW":
            raise invalid("input", "only NCHW image inputs [batch, C, H, W] are supported")
        channels = shape[1]
        for key in ("mean", "std"):
            values = require(data, key, list, "input")
            if len(values) != channels or not all(is_number(v) for v in values):
                raise invalid(f"input.{key}", f"must be {channels} finite numbers (one per channel)")
        if any(v <= 0 for v in data["std"]):
            raise invalid("input.std", "must be positive")
        names = require(data, "class_names", list, "input")
        if len(names) != num_classes or not all(isinstance(n, str) for n in names):
            raise invalid("input.class_names", f"must be {num_classes} strings (one per class)")
        return cls(name, shape, tuple(data["mean"]), tuple(data["std"]), tuple(names))

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "layout": self.layout,
                "mean": list(self.mean), "std": list(self.std), "class_names": list(self.class_names)}


@dataclass(frozen=True)
class PolicySpec:
    """An exit's policy as stored: kind (a name in POLICIES), threshold and extra arguments; with an ensemble at
    deferral (a name in ENSEMBLES), this exit's weight in the mean of every later stage (the final stage's is 1)."""

    kind: str
    threshold: float
    args: dict = field(default_factory=dict)
    ensemble: str = NO_ENSEMBLE
    weight: float = 1.0

    def build(self, args: dict | None = None) -> Policy:
        """The runtime Policy this spec describes; `args` override the stored arguments."""
        return get_policy(self.kind)(self.threshold, {**self.args, **(args or {})})

    def for_exit(self, index: int, num_exits: int) -> "PolicySpec":
        """This spec for exit `index` of `num_exits`: list-valued args (one value per exit) resolved."""
        return dataclasses.replace(self, args=per_exit_args(self.args, index, num_exits))

    def with_threshold(self, threshold: float) -> "PolicySpec":
        return dataclasses.replace(self, threshold=float(threshold))

    def with_args(self, args: dict | None) -> "PolicySpec":
        """This spec with `args` merged over its stored arguments."""
        return dataclasses.replace(self, args={**self.args, **(args or {})})

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "PolicySpec":
        kind = require(data, "kind", str, where)
        threshold = require(data, "threshold", (int, float), where)
        if not is_number(threshold):
            raise invalid(f"{where}.threshold", "must be a finite number")
        args = data.get("args", {})
        if not isinstance(args, dict):
            raise invalid(f"{where}.args", "must be an object")
        ensemble = data.get("ensemble", NO_ENSEMBLE)
        if ensemble not in ensemble_choices():
            raise invalid(f"{where}.ensemble", f"must be one of {', '.join(ensemble_choices())}")
        weight = data.get("weight", 1.0)
        if not is_number(weight) or weight <= 0:
            raise invalid(f"{where}.weight", "must be a finite number > 0")
        return cls(kind, threshold, dict(args), ensemble, float(weight))

    def to_dict(self) -> dict:
        entry = {"kind": self.kind, "threshold": self.threshold, "args": dict(self.args)}
        return entry if self.ensemble == NO_ENSEMBLE else {**entry, "ensemble": self.ensemble, "weight": self.weight}


@dataclass(frozen=True)
class ExitSpec:
    """An early exit: role -> output tensor name (in graph output order), its policy, cut point and temperature.

    `temperature` (> 0, default 1) divides the exit's class logits before a softmax policy uses
    them; `edgeexit calibrate` fits it on the calibration split.
    """

    outputs: dict[str, str]
    policy: PolicySpec
    cut: str = ""
    temperature: float = 1.0

    @classmethod
    def from_dict(cls, data: Any, where: str, output_names: Sequence[str]) -> "ExitSpec":
        if not isinstance(data, dict):
            raise invalid(where, "early stages need an exit description")
        roles = require(data, "outputs", dict, where)
        if not all(isinstance(v, str) for v in roles.values()) or sorted(roles.values()) != sorted(output_names):
            raise invalid(f"{where}.outputs", "must name every output after the features")
        policy = PolicySpec.from_dict(require(data, "policy", dict, where), f"{where}.policy")
        temperature = data.get("temperature", 1.0)
        if not is_number(temperature) or temperature <= 0:
            raise invalid(f"{where}.temperature", "must be a finite number > 0")
        return cls(dict(roles), policy, str(data.get("cut", "")), float(temperature))

    def to_dict(self) -> dict:
        return {"outputs": dict(self.outputs), "policy": self.policy.to_dict(), "cut": self.cut,
                "temperature": self.temperature}


@dataclass(frozen=True)
class StageMacs:
    """MACs of a stage's segment, of its exit head, and of everything up to and including it."""

    segment: int
    head: int
    cumulative: int

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "StageMacs":
        return cls(*(count(data, key, where) for key in ("segment", "head", "cumulative")))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class StageSpec:
    """One stage graph: a backbone segment fused with its exit head (exit None for the final stage), or in a model
    cascade a whole model whose exit is its classifier.

    `reads`: READS_INPUT (the bundle's input) or READS_FEATURES (the previous stage's first output). An early
    stage outputs [features, *exit outputs], or only its exit outputs when a whole model ends there."""

    index: int
    file: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    macs: StageMacs
    params: int
    exit: ExitSpec | None
    reads: str = READS_FEATURES

    @property
    def output_names(self) -> list[str]:
        return [tensor.name for tensor in self.outputs]

    @property
    def reads_input(self) -> bool:
        return self.reads == READS_INPUT

    @property
    def features(self) -> TensorSpec | None:
        """The features the next stage may read: the first output of an early stage whose model goes on, else None."""
        if self.exit is None or self.outputs[0].name in self.exit.outputs.values():
            return None
        return self.outputs[0]

    @property
    def exit_positions(self) -> dict[str, int]:
        """Role -> position in the stage's outputs of each exit output."""
        names = self.output_names
        return {role: names.index(name) for role, name in self.exit.outputs.items()}

    @classmethod
    def from_dict(cls, data: Any, index: int, final: bool, num_classes: int, source: TensorSpec,
                  previous: TensorSpec | None) -> "StageSpec":
        """One stage, checked against its place in the chain (`source`: the bundle's input; `previous`: the previous
        stage's features, None when it has none)."""
        where = f"stages[{index}]"
        if require(data, "index", int, where) != index:
            raise invalid(f"{where}.index", f"expected {index}")
        if require(data, "file", str, where) != stage_file(index):
            raise invalid(f"{where}.file", f"expected '{stage_file(index)}'")
        sha = sha256_of(data, where)
        inputs = _tensors(require(data, "inputs", list, where), f"{where}.inputs")
        outputs = _tensors(require(data, "outputs", list, where), f"{where}.outputs")
        reads = data.get("reads", READS_INPUT if index == 0 else READS_FEATURES)
        if reads not in STAGE_READS:
            raise invalid(f"{where}.reads", f"must be one of {', '.join(STAGE_READS)}")
        if reads == READS_FEATURES and previous is None:
            raise invalid(f"{where}.reads", "the previous stage has no features output: it must read the input")
        previous = source if reads == READS_INPUT else previous
        if len(inputs) != 1 or inputs[0] != previous:
            raise invalid(f"{where}.inputs", f"must be the single tensor '{previous.name}' {list(previous.shape)}")
        macs = StageMacs.from_dict(require(data, "macs", dict, where), f"{where}.macs")
        params = count(data, "params", where)
        exit_spec = None
        if final:
            if data.get("exit") is not None:
                raise invalid(f"{where}.exit", "the final stage has no exit: must be null")
            if len(outputs) != 1 or outputs[0].shape[1:] != (num_classes,):
                raise invalid(f"{where}.outputs", f"final stage must output logits [batch, {num_classes}]")
        else:
            names = [t.name for t in outputs]
            roles = data["exit"].get("outputs") if isinstance(data.get("exit"), dict) else None
            ends = isinstance(roles, dict) and all(isinstance(v, str) for v in roles.values()) and sorted(roles.values()) == sorted(names)
            exit_spec = ExitSpec.from_dict(data.get("exit"), f"{where}.exit", names if ends else names[1:])
        return cls(index, data["file"], sha, inputs, outputs, macs, params, exit_spec, reads)

    def to_dict(self) -> dict:
        return {"index": self.index, "file": self.file, "sha256": self.sha256, "reads": self.reads,
                "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
                "macs": self.macs.to_dict(), "params": self.params,
                "exit": None if self.exit is None else self.exit.to_dict()}


@dataclass(frozen=True)
class FullGraph:
    """full.onnx: the plain backbone, the no-exit baseline; its MACs are the cost unit."""

    sha256: str
    macs: int
    params: int
    file: str = FULL_NAME

    @classmethod
    def from_dict(cls, data: dict) -> "FullGraph":
        if require(data, "file", str, "full") != FULL_NAME:
            raise invalid("full.file", f"expected '{FULL_NAME}'")
        sha = sha256_of(data, "full")
        return cls(sha, count(data, "macs", "full", minimum=1), count(data, "params", "full"))

    def to_dict(self) -> dict:
        return {"file": self.file, "sha256": self.sha256, "macs": self.macs, "params": self.params}


@dataclass(frozen=True)
class CascadeTensor:
    """An input or output of cascade.onnx: name, shape, dtype, and for optional inputs their default."""

    name: str
    shape: tuple
    dtype: str
    default: tuple[float, ...] | None = None

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "CascadeTensor":
        name = require(data, "name", str, where)
        shape = require(data, "shape", list, where)
        if not shape or not all(d == BATCH_DIM or (isinstance(d, int) and not isinstance(d, bool) and d > 0) for d in shape):
            raise invalid(f"{where}.shape", f"dims must be '{BATCH_DIM}' or positive ints")
        dtype = require(data, "dtype", str, where)
        if dtype not in CASCADE_DTYPES:
            raise invalid(f"{where}.dtype", f"must be one of {', '.join(CASCADE_DTYPES)}")
        default = data.get("default")
        if default is not None and (not isinstance(default, list) or not all(is_number(v) for v in default)):
            raise invalid(f"{where}.default", "must be a list of finite numbers")
        return cls(name, tuple(shape), dtype, None if default is None else tuple(float(v) for v in default))

    def to_dict(self) -> dict:
        entry = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        return entry if self.default is None else {**entry, "default": list(self.default)}


@dataclass(frozen=True)
class CascadeGraph:
    """cascade.onnx: the whole cascade as one graph. Inputs: the bundle's input, then per-exit float64
    vectors with defaults (thresholds; beta; temperature); outputs: scores, prediction, exit_index.

    `vectors` says how the file stores the per-exit vectors: VECTORS_CONSTANT (plain initializers, so a
    bare session takes the image alone and loads without warnings; the runtime moves them into graph
    inputs in memory, cascade_bytes.tunable_cascade_bytes) or VECTORS_INPUT (bundles written before: initializers
    that are also graph inputs, which onnxruntime warns about at load)."""

    sha256: str
    inputs: tuple[CascadeTensor, ...]
    outputs: tuple[CascadeTensor, ...]
    file: str = CASCADE_NAME
    vectors: str = VECTORS_INPUT

    def default(self, name: str) -> tuple[float, ...] | None:
        """The default of optional input `name`, None if the graph has no such input."""
        return next((t.default for t in self.inputs[1:] if t.name == name), None)

    @classmethod
    def from_dict(cls, data: Any, input_spec: "InputSpec", num_exits: int, file: str = CASCADE_NAME) -> "CascadeGraph":
        """`file`: the graph this entry must name (cascade.onnx, or cascade_b1.onnx for the batch-1 graph)."""
        where = file.removesuffix(".onnx")
        if require(data, "file", str, where) != file:
            raise invalid(f"{where}.file", f"expected '{file}'")
        sha = sha256_of(data, where)
        tensors = {}
        for kind in ("inputs", "outputs"):
            raw = require(data, kind, list, where)
            tensors[kind] = tuple(CascadeTensor.from_dict(t, f"{where}.{kind}[{i}]") for i, t in enumerate(raw))
        inputs, outputs = tensors["inputs"], tensors["outputs"]
        if not inputs or inputs[0].name != input_spec.name or inputs[0].shape[1:] != tuple(input_spec.shape[1:]):
            raise invalid(f"{where}.inputs", f"the first input must be the bundle's '{input_spec.name}' {list(input_spec.shape)}")
        for i, tensor in enumerate(inputs[1:], 1):
            if tensor.shape != (num_exits,) or tensor.default is None or len(tensor.default) != num_exits:
                raise invalid(f"{where}.inputs[{i}]", f"must be a [{num_exits}] vector with {num_exits} default numbers")
        if tuple(t.name for t in outputs) != CASCADE_OUTPUTS:
            raise invalid(f"{where}.outputs", f"must be {', '.join(CASCADE_OUTPUTS)}")
        vectors = data.get("vectors", VECTORS_INPUT)
        if vectors not in CASCADE_VECTORS:
            raise invalid(f"{where}.vectors", f"must be one of {', '.join(CASCADE_VECTORS)}")
        return cls(sha, inputs, outputs, file=file, vectors=vectors)

    def to_dict(self) -> dict:
        return {"file": self.file, "sha256": self.sha256, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs], "vectors": self.vectors}


@dataclass(frozen=True)
class Manifest:
    """A validated manifest plus the folder it came from."""

    root: Path
    producer: Producer
    model: ModelInfo
    num_classes: int
    input_spec: InputSpec
    full: FullGraph
    stages: tuple[StageSpec, ...]
    calibration: dict | None = None  # the record `edgeexit calibrate` wrote (see calibrate.calibrate)
    profiles: dict[str, DeviceProfile] = dataclasses.field(default_factory=dict)  # by key, from `edgeexit profile`
    cascade: CascadeGraph | None = None  # cascade.onnx; None in bundles exported without it
    precision: str = FP32  # int8 for a bundle written by `edgeexit quantize`
    quantization: dict | None = None  # int8: settings, calibration data and `parent` (fp32 folder name, manifest sha256)
    static_batch: int | None = None  # `edgeexit static-batch`: every tensor's first dim is this int, not "batch"
    cascade_b1: CascadeGraph | None = None  # cascade_b1.onnx, what `run` uses at batch 1; None in older or static bundles

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one input sample."""
        return self.input_spec.sample_shape

    @property
    def exits(self) -> list[ExitSpec]:
        """Exit descriptions of the early stages, in order."""
        return [stage.exit for stage in self.stages[:-1]]

    @property
    def policies(self) -> list[PolicySpec]:
        return [exit_spec.policy for exit_spec in self.exits]

    @property
    def full_macs(self) -> int:
        return self.full.macs

    def exit_costs(self) -> list[float]:
        """Relative MACs spent by an input that leaves at each exit (last = final stage)."""
        return [stage.macs.cumulative / self.full_macs for stage in self.stages]

    def files(self) -> list[StageSpec | FullGraph | CascadeGraph]:
        """Entries (file, sha256) of every graph: the stages, full.onnx, then the cascade graphs present."""
        return [*self.stages, self.full, *self.cascades]

    @property
    def cascades(self) -> list[CascadeGraph]:
        """The one-graph cascades present: cascade.onnx, then cascade_b1.onnx."""
        return [graph for graph in (self.cascade, self.cascade_b1) if graph is not None]

    def cascade_for(self, batch_size: int | None) -> CascadeGraph | None:
        """The graph for calls of `batch_size` inputs: cascade_b1.onnx at 1 when the bundle has it, else cascade.onnx."""
        return self.cascade_b1 if batch_size == 1 and self.cascade_b1 is not None else self.cascade

    def full_tensors(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """What full.onnx must look like: the bundle's input in, [batch, num_classes] logits out."""
        return [TensorSpec(self.input_spec.name, self.input_spec.shape)], [TensorSpec(None, (self.batch_dim, self.num_classes))]

    @property
    def batch_dim(self) -> str | int:
        """The first dim of every tensor: the symbolic 'batch', or a static-batch bundle's N."""
        return BATCH_DIM if self.static_batch is None else self.static_batch

    def path(self, name: str) -> Path:
        return self.root / name

    @classmethod
    def from_dict(cls, data: Any, root: str | os.PathLike = ".") -> "Manifest":
        """Validate a manifest dict and build its records; BundleError naming the first problem."""
        if not isinstance(data, dict):
            raise invalid("top level", "must be a JSON object")
        if data.get("format") != FORMAT:
            raise invalid("format", f"expected '{FORMAT}', got {data.get('format')!r}")
        version = require(data, "format_version", int, "manifest")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"bundle format version {version} is not supported by this edgeexit "
                f"(it reads version {FORMAT_VERSION}); re-export the model or upgrade edgeexit"
            )
        producer = Producer.from_dict(require(data, "producer", dict, "manifest"))
        model = ModelInfo.from_dict(require(data, "model", dict, "manifest"))
        spec = require(data, "input", dict, "manifest")
        num_classes = require(data, "num_classes", int, "manifest")
        if num_classes < 2:
            raise invalid("num_classes", "must be >= 2")
        input_spec = InputSpec.from_dict(spec, num_classes)
        static_batch = data.get("static_batch")
        if static_batch is not None and not is_batch_size(static_batch):
            raise invalid("static_batch", f"must be a positive int or null, got {static_batch!r}")
        check_batch_dim("input.shape", input_spec.shape, static_batch)
        full = FullGraph.from_dict(require(data, "full", dict, "manifest"))
        raw_stages = require(data, "stages", list, "manifest")
        if not raw_stages:
            raise invalid("stages", "need at least the final stage")
        source, previous = TensorSpec(input_spec.name, input_spec.shape), None
        stages = []
        for index, stage in enumerate(raw_stages):
            stages.append(StageSpec.from_dict(stage, index, index == len(raw_stages) - 1, num_classes, source, previous))
            previous = stages[-1].features
        calibration = data.get("calibration")
        if calibration is not None and not isinstance(calibration, dict):
            raise invalid("calibration", "must be an object or null")
        precision, quantization = _precision(data)
        tensors = [(f"stages[{s.index}]", t.shape) for s in stages for t in (*s.inputs, *s.outputs)]
        for where, shape in tensors:
            check_batch_dim(where, shape, static_batch)
        cascade, cascade_b1 = (None if data.get(key) is None else CascadeGraph.from_dict(data[key], input_spec, len(stages) - 1, file)
                               for key, file in (("cascade", CASCADE_NAME), ("cascade_b1", CASCADE_B1_NAME)))
        return cls(Path(root), producer, model, num_classes, input_spec, full, tuple(stages), calibration,
                   read_profiles(data.get("profiles"), len(stages)), cascade, precision, quantization, static_batch, cascade_b1)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "producer": self.producer.to_dict(),
            "model": self.model.to_dict(),
            "num_classes": self.num_classes,
            "input": self.input_spec.to_dict(),
            "full": self.full.to_dict(),
            "stages": [stage.to_dict() for stage in self.stages],
            "calibration": self.calibration,
            "profiles": {key: profile.to_dict() for key, profile in self.profiles.items()},
            **({"cascade": self.cascade.to_dict()} if self.cascade else {}),
            **({"cascade_b1": self.cascade_b1.to_dict()} if self.cascade_b1 else {}),
            "precision": self.precision,
            "quantization": self.quantization,
            "static_batch": self.static_batch,
        }


def _precision(data: dict) -> tuple[str, dict | None]:
    """precision (fp32 default, or int8) and the quantization record an int8 bundle must carry (naming its parent)."""
    precision = data.get("precision", FP32)
    if precision not in PRECISIONS:
        raise invalid("precision", f"must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    quantization = data.get("quantization")
    if precision == INT8:
        parent = require(require(data, "quantization", dict, "manifest"), "parent", dict, "quantization")
        require(parent, "name", str, "quantization.parent")
        require(parent, "manifest_sha256", str, "quantization.parent")
    elif quantization is not None:
        raise invalid("quantization", "only an int8 bundle has a quantization record")
    return precision, quantization


def validate(data: Any) -> Manifest:
    """Check a manifest dict against the schema and return its records (root: the current folder)."""
    return Manifest.from_dict(data)


def read_manifest(root: str | os.PathLike) -> dict:
    """Read manifest.json from a bundle folder as a raw dict (not validated), with BundleError on any failure."""
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"bundle folder not found: {root}")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"not a bundle: {path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError covers JSON and Unicode errors
        raise BundleError(f"cannot read {path}: {str(exc)[:200] or type(exc).__name__}") from None


def load_manifest(root: str | os.PathLike, check_hashes: bool = True) -> Manifest:
    """Load, validate and (by default) hash-check a bundle's manifest and graph files."""
    manifest = Manifest.from_dict(read_manifest(root), Path(root))
    if check_hashes:
        for entry in manifest.files():
            check_file_hash(manifest.root, entry)
    return manifest


def check_file_hash(root: Path, entry: StageSpec | FullGraph) -> None:
    """Refuse a graph file that is missing, unreadable or differs from its manifest sha256."""
    path = root / entry.file
    if not path.is_file():
        raise BundleError(f"bundle file missing: {path}")
    try:
        digest = sha256_file(path)
    except OSError as exc:
        raise BundleError(f"cannot read bundle file {path}: {exc.strerror or exc}") from None
    if digest != entry.sha256:
        raise BundleError(f"bundle file {path} does not match its sha256 in the manifest (tampered or corrupt)")


