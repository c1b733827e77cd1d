"""The bundle format, stated once: typed manifest records, their validation, hashing and atomic writes.

manifest.json is read into frozen dataclasses (Manifest, InputSpec, StageSpec, ExitSpec,
PolicySpec, ...): `from_dict` validates and builds each record, naming the first problem
as "invalid manifest: WHERE: WHY"; `to_dict` writes it back. The exporter builds these
records, calibration replaces thresholds through them, and every other module reads
attributes, never raw manifest keys.

Adding a field: give the dataclass a field with a default, read (and check) it in
`from_dict`, write it in `to_dict`; bump FORMAT_VERSION when older readers must refuse it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgeexit.errors import BundleError, InputError
from edgeexit.runtime.policies import NO_ENSEMBLE, Policy, ensemble_choices, get_policy, per_exit_args

FORMAT = "edgeexit-bundle"
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
FULL_NAME = "full.onnx"
CASCADE_NAME = "cascade.onnx"
CASCADE_OUTPUTS = ("scores", "prediction", "exit_index")
CASCADE_DTYPES = ("float32", "float64", "int64")
# where cascade.onnx stores its per-exit vectors: plain constants (bare sessions take the image alone), or
# initializers that are also graph inputs (bundles written before; onnxruntime warns at load)
VECTORS_CONSTANT, VECTORS_INPUT = "constant", "input"
CASCADE_VECTORS = (VECTORS_CONSTANT, VECTORS_INPUT)
BATCH_DIM = "batch"
FP32, INT8 = "fp32", "int8"
PRECISIONS = (FP32, INT8)
GRAPH_DTYPE = "tensor(float)"
# ITU-R 601 luma weights: Pillow's RGB -> "L" conversion, so arrays and image files agree
LUMA = (0.299, 0.587, 0.114)

Shape = tuple  # ("batch", C, H, W): the symbolic batch dim, then positive ints


def stage_file(index: int) -> str:
    """File name of stage `index` inside a bundle."""
    return f"stage_{index}.onnx"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- validation helpers


def _fail(where: str, why: str) -> BundleError:
    return BundleError(f"invalid manifest: {where}: {why}")


def _require(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise _fail(where, f"missing key '{key}'")
    value = obj[key]
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise _fail(f"{where}.{key}", f"expected {_kind_name(kind)}, got bool")
    if not isinstance(value, kind):
        raise _fail(f"{where}.{key}", f"expected {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _sha256(entry: dict, where: str) -> str:
    value = _require(entry, "sha256", str, where)
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise _fail(f"{where}.sha256", "must be 64 lowercase hex digits")
    return value


def _is_batch_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _shape(shape: Any, where: str) -> Shape:
    if not isinstance(shape, list) or not shape:
        raise _fail(where, "shape must be a non-empty list")
    if shape[0] != BATCH_DIM and not _is_batch_size(shape[0]):
        raise _fail(where, f"first dim must be the symbolic '{BATCH_DIM}' (or a static-batch bundle's batch size)")
    for dim in shape[1:]:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise _fail(where, f"dims after the batch must be positive ints, got {dim!r}")
    return tuple(shape)


def _count(obj: dict, key: str, where: str, minimum: int = 0) -> int:
    value = _require(obj, key, int, where)
    if value < minimum:
        raise _fail(f"{where}.{key}", f"must be >= {minimum}" if minimum != 1 else "must be a positive int")
    return value


# ---------------------------------------------------------------- pixels: the one numpy preprocessing


def normalize(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Per-channel (x - mean) / std on NCHW float32."""
    mean_arr = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std_arr = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return ((x - mean_arr) / std_arr).astype(np.float32)


def _interp_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) bilinear interpolation weights, align_corners=False convention."""
    scale = size_in / size_out
    centers = np.clip((np.arange(size_out) + 0.5) * scale - 0.5, 0, size_in - 1)
    low = np.floor(centers).astype(int)
    high = np.minimum(low + 1, size_in - 1)
    frac = centers - low
    weights = np.zeros((size_out, size_in), dtype=np.float32)
    weights[np.arange(size_out), low] += 1 - frac
    weights[np.arange(size_out), high] += frac
    return weights


def resize(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of (..., H, W) arrays: half-pixel centres (align_corners=False), no antialiasing,
    i.e. torch.nn.functional.interpolate(mode="bilinear", align_corners=False, antialias=False)."""
    if images.shape[-2:] == (height, width):
        return images.astype(np.float32, copy=False)
    rows = _interp_matrix(images.shape[-2], height)
    cols = _interp_matrix(images.shape[-1], width)
    return np.einsum("hi,...ij,wj->...hw", rows, images, cols).astype(np.float32)


def to_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """NCHW with 1 or 3 channels -> `channels`: gray repeated to RGB, RGB to gray by ITU-R 601 luma."""
    have = x.shape[1]
    if have == channels:
        return x
    if have == 1:
        return np.repeat(x, channels, axis=1)
    if have == 3 and channels == 1:
        return np.tensordot(np.asarray(LUMA, dtype=np.float32), x, axes=([0], [1]))[:, None].astype(np.float32)
    raise InputError(f"cannot convert {have}-channel images to the bundle's {channels} channels")


# ---------------------------------------------------------------- the records


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: its name and shape ("batch", dims...); name None matches any name."""

    name: str | None
    shape: Shape

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "TensorSpec":
        return cls(_require(data, "name", str, where), _shape(_require(data, "shape", list, where), f"{where}.shape"))

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape)}


def _tensors(data: Any, where: str) -> tuple[TensorSpec, ...]:
    if not isinstance(data, list) or not data:
        raise _fail(where, "must be a non-empty list of tensors")
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
        _, height, width = self.sample_shape
        return self.normalize(to_channels(resize(np.asarray(images, dtype=np.float32), height, width), self.channels))

    @classmethod
    def from_dict(cls, data: dict, num_classes: int) -> "InputSpec":
        name = _require(data, "name", str, "input")
        shape = _shape(_require(data, "shape", list, "input"), "input.shape")
        if _require(data, "dtype", str, "input") != "float32":
            raise _fail("input.dtype", "only float32 inputs are supported")
        if len(shape) != 4 or _require(data, "layout", str, "input") != "NCHW":
            raise _fail("input", "only NCHW image inputs [batch, C, H, W] are supported")
        channels = shape[1]
        for key in ("mean", "std"):
            values = _require(data, key, list, "input")
            if len(values) != channels or not all(_is_number(v) for v in values):
                raise _fail(f"input.{key}", f"must be {channels} finite numbers (one per channel)")
        if any(v <= 0 for v in data["std"]):
            raise _fail("input.std", "must be positive")
        names = _require(data, "class_names", list, "input")
        if len(names) != num_classes or not all(isinstance(n, str) for n in names):
            raise _fail("input.class_names", f"must be {num_classes} strings (one per class)")
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
        kind = _require(data, "kind", str, where)
        threshold = _require(data, "threshold", (int, float), where)
        if not _is_number(threshold):
            raise _fail(f"{where}.threshold", "must be a finite number")
        args = data.get("args", {})
        if not isinstance(args, dict):
            raise _fail(f"{where}.args", "must be an object")
        ensemble = data.get("ensemble", NO_ENSEMBLE)
        if ensemble not in ensemble_choices():
            raise _fail(f"{where}.ensemble", f"must be one of {', '.join(ensemble_choices())}")
        weight = data.get("weight", 1.0)
        if not _is_number(weight) or weight <= 0:
            raise _fail(f"{where}.weight", "must be a finite number > 0")
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
            raise _fail(where, "early stages need an exit description")
        roles = _require(data, "outputs", dict, where)
        if not all(isinstance(v, str) for v in roles.values()) or sorted(roles.values()) != sorted(output_names):
            raise _fail(f"{where}.outputs", "must name every output after the features")
        policy = PolicySpec.from_dict(_require(data, "policy", dict, where), f"{where}.policy")
        temperature = data.get("temperature", 1.0)
        if not _is_number(temperature) or temperature <= 0:
            raise _fail(f"{where}.temperature", "must be a finite number > 0")
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
        return cls(*(_count(data, key, where) for key in ("segment", "head", "cumulative")))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class StageSpec:
    """One stage graph: a backbone segment fused with its exit head (exit None for the final stage)."""

    index: int
    file: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    macs: StageMacs
    params: int
    exit: ExitSpec | None

    @property
    def output_names(self) -> list[str]:
        return [tensor.name for tensor in self.outputs]

    @classmethod
    def from_dict(cls, data: Any, index: int, final: bool, num_classes: int, previous: TensorSpec) -> "StageSpec":
        """One stage, checked against its place in the chain (`previous` = the tensor it consumes)."""
        where = f"stages[{index}]"
        if _require(data, "index", int, where) != index:
            raise _fail(f"{where}.index", f"expected {index}")
        if _require(data, "file", str, where) != stage_file(index):
            raise _fail(f"{where}.file", f"expected '{stage_file(index)}'")
        sha = _sha256(data, where)
        inputs = _tensors(_require(data, "inputs", list, where), f"{where}.inputs")
        outputs = _tensors(_require(data, "outputs", list, where), f"{where}.outputs")
        if len(inputs) != 1 or inputs[0] != previous:
            raise _fail(f"{where}.inputs", f"must be the single tensor '{previous.name}' {list(previous.shape)}")
        macs = StageMacs.from_dict(_require(data, "macs", dict, where), f"{where}.macs")
        params = _count(data, "params", where)
        exit_spec = None
        if final:
            if data.get("exit") is not None:
                raise _fail(f"{where}.exit", "the final stage has no exit: must be null")
            if len(outputs) != 1 or outputs[0].shape[1:] != (num_classes,):
                raise _fail(f"{where}.outputs", f"final stage must output logits [batch, {num_classes}]")
        else:
            exit_spec = ExitSpec.from_dict(data.get("exit"), f"{where}.exit", [t.name for t in outputs[1:]])
        return cls(index, data["file"], sha, inputs, outputs, macs, params, exit_spec)

    def to_dict(self) -> dict:
        return {"index": self.index, "file": self.file, "sha256": self.sha256,
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
        if _require(data, "file", str, "full") != FULL_NAME:
            raise _fail("full.file", f"expected '{FULL_NAME}'")
        sha = _sha256(data, "full")
        return cls(sha, _count(data, "macs", "full", minimum=1), _count(data, "params", "full"))

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
        name = _require(data, "name", str, where)
        shape = _require(data, "shape", list, where)
        if not shape or not all(d == BATCH_DIM or (isinstance(d, int) and not isinstance(d, bool) and d > 0) for d in shape):
            raise _fail(f"{where}.shape", f"dims must be '{BATCH_DIM}' or positive ints")
        dtype = _require(data, "dtype", str, where)
        if dtype not in CASCADE_DTYPES:
            raise _fail(f"{where}.dtype", f"must be one of {', '.join(CASCADE_DTYPES)}")
        default = data.get("default")
        if default is not None and (not isinstance(default, list) or not all(_is_number(v) for v in default)):
            raise _fail(f"{where}.default", "must be a list of finite numbers")
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
    inputs in memory, graph.tunable_cascade_bytes) or VECTORS_INPUT (bundles written before: initializers
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
    def from_dict(cls, data: Any, input_spec: "InputSpec", num_exits: int) -> "CascadeGraph":
        where = "cascade"
        if _require(data, "file", str, where) != CASCADE_NAME:
            raise _fail(f"{where}.file", f"expected '{CASCADE_NAME}'")
        sha = _sha256(data, where)
        tensors = {}
        for kind in ("inputs", "outputs"):
            raw = _require(data, kind, list, where)
            tensors[kind] = tuple(CascadeTensor.from_dict(t, f"{where}.{kind}[{i}]") for i, t in enumerate(raw))
        inputs, outputs = tensors["inputs"], tensors["outputs"]
        if not inputs or inputs[0].name != input_spec.name or inputs[0].shape[1:] != tuple(input_spec.shape[1:]):
            raise _fail(f"{where}.inputs", f"the first input must be the bundle's '{input_spec.name}' {list(input_spec.shape)}")
        for i, tensor in enumerate(inputs[1:], 1):
            if tensor.shape != (num_exits,) or tensor.default is None or len(tensor.default) != num_exits:
                raise _fail(f"{where}.inputs[{i}]", f"must be a [{num_exits}] vector with {num_exits} default numbers")
        if tuple(t.name for t in outputs) != CASCADE_OUTPUTS:
            raise _fail(f"{where}.outputs", f"must be {', '.join(CASCADE_OUTPUTS)}")
        vectors = data.get("vectors", VECTORS_INPUT)
        if vectors not in CASCADE_VECTORS:
            raise _fail(f"{where}.vectors", f"must be one of {', '.join(CASCADE_VECTORS)}")
        return cls(sha, inputs, outputs, vectors=vectors)

    def to_dict(self) -> dict:
        return {"file": self.file, "sha256": self.sha256, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs], "vectors": self.vectors}


@dataclass(frozen=True)
class ModelInfo:
    """How the bundle's model was built (informational: the runtime never needs it)."""

    method: str
    backbone: str
    exit_type: str
    cuts: tuple[str, ...]

    @classmethod
    def from_dict(cls, data: dict) -> "ModelInfo":
        values = [_require(data, key, str, "model") for key in ("method", "backbone", "exit_type")]
        cuts = _require(data, "cuts", list, "model")
        if not all(isinstance(c, str) for c in cuts):
            raise _fail("model.cuts", "must be a list of strings")
        return cls(*values, tuple(cuts))

    def to_dict(self) -> dict:
        return {"method": self.method, "backbone": self.backbone, "exit_type": self.exit_type, "cuts": list(self.cuts)}


@dataclass(frozen=True)
class Producer:
    """Who wrote the bundle: edgeexit's version and the ONNX opset, plus (when exported from PyTorch)
    the torch, onnx and onnxruntime versions and the exporting host's machine type."""

    edgeexit: str
    opset: int
    torch: str | None = None
    onnx: str | None = None
    onnxruntime: str | None = None
    host: str | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "Producer":
        optional = {k: _require(data, k, str, "producer") for k in ("torch", "onnx", "onnxruntime", "host") if k in data}
        return cls(_require(data, "edgeexit", str, "producer"), _require(data, "opset", int, "producer"), **optional)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Timing:
    """Milliseconds of one measured path over warm repeats: mean and percentiles."""

    mean: float
    min: float
    p50: float
    p95: float
    p99: float

    QUANTILES = (("min", 0.0), ("p50", 0.50), ("p95", 0.95), ("p99", 0.99))

    @classmethod
    def from_seconds(cls, seconds: Sequence[float]) -> "Timing":
        """Timing of per-call wall times given in seconds."""
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        return cls(float(ms.mean()), float(ms.min()), *(float(np.percentile(ms, q)) for q in (50, 95, 99)))

    def stat(self, name: str) -> float:
        """The value named 'mean', 'p50' or 'p95'."""
        return getattr(self, name)

    def to_dict(self) -> dict:
        return {"mean": self.mean, "min": self.min, "p50": self.p50, "p95": self.p95, "p99": self.p99}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "Timing":
        values = [_require(data, key, (int, float), where) for key in ("mean", "min", "p50", "p95", "p99")]
        if not all(_is_number(v) and v >= 0 for v in values):
            raise _fail(where, "timings must be finite numbers >= 0 ms")
        if not values[1] <= values[2] <= values[3] <= values[4]:
            raise _fail(where, "timings must satisfy min <= p50 <= p95 <= p99")
        return cls(*(float(v) for v in values))


ENGINES = ("auto", "graph", "chain")  # how a bundle runs: cascade.onnx, one session per stage, or graph when present


def profile_key(host: str, device: str, threads: int, batch_size: int, engine: str) -> str:
    """The name a device profile is stored and selected under: HOST/DEVICE/tTHREADS/bBATCH/ENGINE."""
    return f"{host}/{device}/t{threads}/b{batch_size}/{engine}"


@dataclass(frozen=True)
class DeviceProfile:
    """Measured latency of a bundle on one host/device/threads/batch (threads 0 = onnxruntime's default).

    `stages[k]`: stage k's session run plus its exit decision, alone. `exits[k]`: one whole
    cascade call in which every input leaves at exit k (the last entry: the final stage), so
    it includes every earlier stage and decision and the runner's bookkeeping. `exits_at_one`:
    `exits` at batch 1 (the same as `exits` when batch_size is 1), for the cost of a stage
    that runs on only a few surviving inputs. `full`: full.onnx. All in ms
    per call at `batch_size` inputs.
    """

    host: str
    device: str
    threads: int
    batch_size: int
    engine: str
    stages: tuple[Timing, ...]
    exits: tuple[Timing, ...]
    exits_at_one: tuple[Timing, ...]
    full: Timing
    repeats: int
    providers: tuple[str, ...]
    onnxruntime: str

    @property
    def key(self) -> str:
        return profile_key(self.host, self.device, self.threads, self.batch_size, self.engine)

    def to_dict(self) -> dict:
        return {
            "host": self.host, "device": self.device, "threads": self.threads, "batch_size": self.batch_size,
            "engine": self.engine, "stages": [t.to_dict() for t in self.stages], "exits": [t.to_dict() for t in self.exits],
            "exits_at_one": [t.to_dict() for t in self.exits_at_one], "full": self.full.to_dict(), "repeats": self.repeats,
            "providers": list(self.providers), "onnxruntime": self.onnxruntime,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str, num_stages: int) -> "DeviceProfile":
        strings = [_require(data, key, str, where) for key in ("host", "device")]
        threads, batch_size, repeats = (_require(data, key, int, where) for key in ("threads", "batch_size", "repeats"))
        if threads < 0 or batch_size < 1 or repeats < 1:
            raise _fail(where, "threads must be >= 0, batch_size and repeats >= 1")
        timings = {}
        for key in ("stages", "exits", "exits_at_one"):
            entries = _require(data, key, list, where)
            if len(entries) != num_stages:
                raise _fail(f"{where}.{key}", f"must have one entry per stage ({num_stages})")
            timings[key] = tuple(Timing.from_dict(t, f"{where}.{key}[{i}]") for i, t in enumerate(entries))
        providers = _require(data, "providers", list, where)
        return cls(*strings, threads, batch_size, _require(data, "engine", str, where), timings["stages"],
                   timings["exits"], timings["exits_at_one"], Timing.from_dict(_require(data, "full", dict, where), f"{where}.full"),
                   repeats, tuple(str(p) for p in providers), _require(data, "onnxruntime", str, where))


def read_profiles(data: Any, num_stages: int) -> dict[str, DeviceProfile]:
    """The manifest's "profiles" object (absent = none) as DeviceProfiles by key, validated."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise _fail("profiles", "must be an object keyed by profile name")
    profiles = {name: DeviceProfile.from_dict(entry, f"profiles[{name!r}]", num_stages) for name, entry in data.items()}
    for name, profile in profiles.items():
        if name != profile.key:
            raise _fail(f"profiles[{name!r}]", f"key must be '{profile.key}' (host/device/threads/batch/engine)")
    return profiles


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
        """Entries (file, sha256) of every graph: the stages, full.onnx, then cascade.onnx if present."""
        return [*self.stages, self.full, *([self.cascade] if self.cascade else [])]

    def full_tensors(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """What full.onnx must look like: the bundle's input in, [batch, num_classes] logits out."""
        return [TensorSpec(self.input_spec.name, self.input_spec.shape)], [TensorSpec(None, (self.batch_dim, self.num_classes))]

    @property
    def batch_dim(self) -> str | int:
        """The first dim of every tensor: the symbolic 'batch', or a static-batch bundle's N."""
        return BATCH_DIM if self.static_batch is None else self.static_batch

    def path(self, name: str) -> Path:
        return self.root / name

    def with_thresholds(self, thresholds: Sequence[float]) -> "Manifest":
        """A copy with exit k's policy threshold set to thresholds[k]."""
        if len(thresholds) != len(self.exits):
            raise BundleError(f"got {len(thresholds)} thresholds for {len(self.exits)} exits")
        stages = [dataclasses.replace(stage, exit=dataclasses.replace(stage.exit, policy=stage.exit.policy.with_threshold(t)))
                  for stage, t in zip(self.stages, thresholds)]
        return dataclasses.replace(self, stages=(*stages, self.stages[-1]))

    def with_policy_args(self, args: Sequence[dict]) -> "Manifest":
        """A copy with args[k] merged into exit k's policy arguments (e.g. a calibrated beta)."""
        if len(args) != len(self.exits):
            raise BundleError(f"got policy arguments for {len(args)} of {len(self.exits)} exits")
        stages = [dataclasses.replace(stage, exit=dataclasses.replace(
                      stage.exit, policy=dataclasses.replace(stage.exit.policy, args={**stage.exit.policy.args, **a})))
                  for stage, a in zip(self.stages, args)]
        return dataclasses.replace(self, stages=(*stages, self.stages[-1]))

    def with_profile(self, profile: DeviceProfile) -> "Manifest":
        """A copy with `profile` added under its key (replacing one measured under the same key)."""
        return dataclasses.replace(self, profiles={**self.profiles, profile.key: profile})

    def describe(self, name: str | None = None) -> list[str]:
        """Readable lines for `edgeexit info`: input, stages, MACs, exit policies, calibration."""
        spec = self.input_spec
        lines = [f"bundle {name or self.root}: {self.model.method} on {self.model.backbone}, {self.num_classes} classes",
                 f"input {spec.name} {list(spec.shape)} {spec.dtype} {spec.layout}",
                 f"full.onnx {self.full_macs / 1e6:.2f} MMACs"]
        if self.precision != FP32:
            lines.append(f"precision {self.precision}, quantized from '{self.quantization['parent']['name']}'")
        if self.static_batch is not None:
            lines.append(f"static batch {self.static_batch} (inputs run in groups of {self.static_batch})")
        for stage, cost in zip(self.stages, self.exit_costs()):
            line = f"  {stage.file}: segment {stage.macs.segment / 1e6:.2f} M + head {stage.macs.head / 1e6:.3f} M"
            line += f", leaving here costs {cost:.3f} of full"
            if stage.exit is not None:
                policy = stage.exit.policy
                line += f"; exit at {stage.exit.cut or '?'}: {policy.kind} threshold {policy.threshold}"
            lines.append(line)
        if self.cascade:
            optional = ", ".join(f"{t.name} (default {list(t.default)})" for t in self.cascade.inputs[1:])
            lines.append(f"{self.cascade.file}: the whole cascade in one graph; optional inputs: {optional}")
        for key, profile in self.profiles.items():
            lines.append(f"profile {key}: full.onnx p50 {profile.full.p50:.3f} ms; leaving at each exit p50 "
                         + ", ".join(f"{t.p50:.3f}" for t in profile.exits) + " ms")
        if self.calibration:
            lines.append(f"calibrated: {json.dumps(self.calibration.get('chosen', {}))}")
        return lines

    @classmethod
    def from_dict(cls, data: Any, root: str | os.PathLike = ".") -> "Manifest":
        """Validate a manifest dict and build its records; BundleError naming the first problem."""
        if not isinstance(data, dict):
            raise _fail("top level", "must be a JSON object")
        if data.get("format") != FORMAT:
            raise _fail("format", f"expected '{FORMAT}', got {data.get('format')!r}")
        version = _require(data, "format_version", int, "manifest")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"bundle format version {version} is not supported by this edgeexit "
                f"(it reads version {FORMAT_VERSION}); re-export the model or upgrade edgeexit"
            )
        producer = Producer.from_dict(_require(data, "producer", dict, "manifest"))
        model = ModelInfo.from_dict(_require(data, "model", dict, "manifest"))
        spec = _require(data, "input", dict, "manifest")
        num_classes = _require(data, "num_classes", int, "manifest")
        if num_classes < 2:
            raise _fail("num_classes", "must be >= 2")
        input_spec = InputSpec.from_dict(spec, num_classes)
        static_batch = data.get("static_batch")
        if static_batch is not None and not _is_batch_size(static_batch):
            raise _fail("static_batch", f"must be a positive int or null, got {static_batch!r}")
        _check_batch_dim("input.shape", input_spec.shape, static_batch)
        full = FullGraph.from_dict(_require(data, "full", dict, "manifest"))
        raw_stages = _require(data, "stages", list, "manifest")
        if len(raw_stages) < 2:
            raise _fail("stages", "need at least one early stage and the final stage")
        previous = TensorSpec(input_spec.name, input_spec.shape)
        stages = []
        for index, stage in enumerate(raw_stages):
            stages.append(StageSpec.from_dict(stage, index, index == len(raw_stages) - 1, num_classes, previous))
            previous = stages[-1].outputs[0]
        calibration = data.get("calibration")
        if calibration is not None and not isinstance(calibration, dict):
            raise _fail("calibration", "must be an object or null")
        precision, quantization = _precision(data)
        tensors = [(f"stages[{s.index}]", t.shape) for s in stages for t in (*s.inputs, *s.outputs)]
        for where, shape in tensors:
            _check_batch_dim(where, shape, static_batch)
        cascade = data.get("cascade")
        if cascade is not None:
            cascade = CascadeGraph.from_dict(cascade, input_spec, len(stages) - 1)
        return cls(Path(root), producer, model, num_classes, input_spec, full, tuple(stages), calibration,
                   read_profiles(data.get("profiles"), len(stages)), cascade, precision, quantization, static_batch)

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
            "precision": self.precision,
            "quantization": self.quantization,
            "static_batch": self.static_batch,
        }


def _check_batch_dim(where: str, shape: Shape, static_batch: int | None) -> None:
    """Every tensor's first dim is the symbolic 'batch', or the static batch of a static-batch bundle."""
    batch = BATCH_DIM if static_batch is None else static_batch
    if shape[0] != batch:
        expected = f"the symbolic '{BATCH_DIM}'" if static_batch is None else f"the static batch {static_batch}"
        raise _fail(where, f"first dim must be {expected}, got {shape[0]!r}")


def _precision(data: dict) -> tuple[str, dict | None]:
    """precision (fp32 default, or int8) and the quantization record an int8 bundle must carry (naming its parent)."""
    precision = data.get("precision", FP32)
    if precision not in PRECISIONS:
        raise _fail("precision", f"must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    quantization = data.get("quantization")
    if precision == INT8:
        parent = _require(_require(data, "quantization", dict, "manifest"), "parent", dict, "quantization")
        _require(parent, "name", str, "quantization.parent")
        _require(parent, "manifest_sha256", str, "quantization.parent")
    elif quantization is not None:
        raise _fail("quantization", "only an int8 bundle has a quantization record")
    return precision, quantization


def validate(data: Any) -> Manifest:
    """Check a manifest dict against the schema and return its records (root: the current folder)."""
    return Manifest.from_dict(data)


def _dims_match(declared: Sequence[Any], actual: Sequence[Any]) -> bool:
    """A declared shape matches a graph's: same rank, the same batch (symbolic, or the static int), equal other dims."""
    if len(declared) != len(actual):
        return False
    batch, *rest = actual
    symbolic = batch is None or isinstance(batch, str)
    same_batch = symbolic if declared[0] == BATCH_DIM else batch == declared[0]
    return same_batch and list(rest) == list(declared[1:])


def check_graph_io(
    file: str,
    expected_inputs: Sequence[TensorSpec],
    expected_outputs: Sequence[TensorSpec],
    inputs: Sequence[Any],
    outputs: Sequence[Any],
) -> None:
    """Check a loaded graph's inputs/outputs (objects with .name, .shape, .type, e.g. onnxruntime
    NodeArgs) against the manifest's tensors, in order; a tensor named None matches any name."""
    for kind, expected, actual in (("inputs", expected_inputs, inputs), ("outputs", expected_outputs, outputs)):
        if len(expected) != len(actual):
            raise BundleError(f"{file} has {len(actual)} {kind}, the manifest declares {len(expected)}")
        for want, got in zip(expected, actual):
            label = got.name if want.name is None else want.name
            if got.name != label:
                raise BundleError(f"{file}: {kind[:-1]} '{got.name}' is declared as '{label}' in the manifest")
            if getattr(got, "type", GRAPH_DTYPE) != GRAPH_DTYPE:
                raise BundleError(f"{file}: {kind[:-1]} '{got.name}' has type {got.type}, expected {GRAPH_DTYPE}")
            if not _dims_match(want.shape, list(got.shape)):
                raise BundleError(f"{file}: {kind[:-1]} '{got.name}' has shape {list(got.shape)}, "
                                  f"the manifest declares {list(want.shape)}")


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


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call write(temporary path) in `path`'s folder (created if missing), fsync, then rename over `path`:
    readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)
        write(Path(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON (indented, newline-terminated) atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8"))


def save_manifest(root: str | os.PathLike, manifest: Manifest | dict) -> Manifest:
    """Validate (a dict) and atomically (re)write a bundle's manifest.json; returns the records written."""
    if not isinstance(manifest, Manifest):
        manifest = Manifest.from_dict(manifest, Path(root))
    write_json_atomic(Path(root) / MANIFEST_NAME, manifest.to_dict())
    return dataclasses.replace(manifest, root=Path(root))
