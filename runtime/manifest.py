"""The bundle format: manifest.json schema, validation, hashing and atomic writes.

This is the one place that knows the bundle layout; the exporter writes through it and
the runtime reads through it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from edgeexit.errors import BundleError

FORMAT = "edgeexit-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
FULL_NAME = "full.onnx"
BATCH_DIM = "batch"
GRAPH_DTYPE = "tensor(float)"


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


def _check_sha256(entry: dict, where: str) -> None:
    value = _require(entry, "sha256", str, where)
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise _fail(f"{where}.sha256", "must be 64 lowercase hex digits")


def _check_shape(shape: Any, where: str) -> None:
    if not isinstance(shape, list) or not shape:
        raise _fail(where, "shape must be a non-empty list")
    if shape[0] != BATCH_DIM:
        raise _fail(where, f"first dim must be the symbolic '{BATCH_DIM}'")
    for dim in shape[1:]:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise _fail(where, f"dims after the batch must be positive ints, got {dim!r}")


def _check_tensors(tensors: Any, where: str) -> list[dict]:
    if not isinstance(tensors, list) or not tensors:
        raise _fail(where, "must be a non-empty list of tensors")
    for i, tensor in enumerate(tensors):
        _require(tensor, "name", str, f"{where}[{i}]")
        _check_shape(_require(tensor, "shape", list, f"{where}[{i}]"), f"{where}[{i}].shape")
    return tensors


def validate(data: Any) -> None:
    """Check a manifest dict against the schema; raise BundleError naming the first problem."""
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
    _require(data, "producer", dict, "manifest")
    spec = _require(data, "input", dict, "manifest")
    _require(spec, "name", str, "input")
    _check_shape(_require(spec, "shape", list, "input"), "input.shape")
    if _require(spec, "dtype", str, "input") != "float32":
        raise _fail("input.dtype", "only float32 inputs are supported")
    if len(spec["shape"]) != 4 or _require(spec, "layout", str, "input") != "NCHW":
        raise _fail("input", "only NCHW image inputs [batch, C, H, W] are supported")
    channels = spec["shape"][1]
    for key in ("mean", "std"):
        values = _require(spec, key, list, "input")
        if len(values) != channels or not all(_is_number(v) for v in values):
            raise _fail(f"input.{key}", f"must be {channels} finite numbers (one per channel)")
    if any(v <= 0 for v in spec["std"]):
        raise _fail("input.std", "must be positive")
    num_classes = _require(data, "num_classes", int, "manifest")
    if num_classes < 2:
        raise _fail("num_classes", "must be >= 2")
    names = _require(spec, "class_names", list, "input")
    if len(names) != num_classes or not all(isinstance(n, str) for n in names):
        raise _fail("input.class_names", f"must be {num_classes} strings (one per class)")

    full = _require(data, "full", dict, "manifest")
    if _require(full, "file", str, "full") != FULL_NAME:
        raise _fail("full.file", f"expected '{FULL_NAME}'")
    _check_sha256(full, "full")
    if _require(full, "macs", int, "full") <= 0:
        raise _fail("full.macs", "must be a positive int")

    stages = _require(data, "stages", list, "manifest")
    if len(stages) < 2:
        raise _fail("stages", "need at least one early stage and the final stage")
    previous_output = spec["name"]
    previous_shape = spec["shape"]
    for index, stage in enumerate(stages):
        where = f"stages[{index}]"
        if _require(stage, "index", int, where) != index:
            raise _fail(f"{where}.index", f"expected {index}")
        if _require(stage, "file", str, where) != stage_file(index):
            raise _fail(f"{where}.file", f"expected '{stage_file(index)}'")
        _check_sha256(stage, where)
        inputs = _check_tensors(_require(stage, "inputs", list, where), f"{where}.inputs")
        outputs = _check_tensors(_require(stage, "outputs", list, where), f"{where}.outputs")
        if len(inputs) != 1 or inputs[0]["name"] != previous_output or inputs[0]["shape"] != previous_shape:
            raise _fail(f"{where}.inputs", f"must be the single tensor '{previous_output}' {previous_shape}")
        macs = _require(stage, "macs", dict, where)
        for key in ("segment", "head", "cumulative"):
            if _require(macs, key, int, f"{where}.macs") < 0:
                raise _fail(f"{where}.macs.{key}", "must be >= 0")
        final = index == len(stages) - 1
        exit_spec = stage.get("exit")
        if final:
            if exit_spec is not None:
                raise _fail(f"{where}.exit", "the final stage has no exit: must be null")
            if len(outputs) != 1 or outputs[0]["shape"] != [BATCH_DIM, num_classes]:
                raise _fail(f"{where}.outputs", f"final stage must output logits [batch, {num_classes}]")
            continue
        if not isinstance(exit_spec, dict):
            raise _fail(f"{where}.exit", "early stages need an exit description")
        roles = _require(exit_spec, "outputs", dict, f"{where}.exit")
        names_out = [t["name"] for t in outputs]
        if not all(isinstance(v, str) for v in roles.values()) or sorted(roles.values()) != sorted(names_out[1:]):
            raise _fail(f"{where}.exit.outputs", "must name every output after the features")
        policy = _require(exit_spec, "policy", dict, f"{where}.exit")
        _require(policy, "kind", str, f"{where}.exit.policy")
        if not _is_number(_require(policy, "threshold", (int, float), f"{where}.exit.policy")):
            raise _fail(f"{where}.exit.policy.threshold", "must be a finite number")
        if not isinstance(policy.get("args", {}), dict):
            raise _fail(f"{where}.exit.policy.args", "must be an object")
        temperature = exit_spec.get("temperature", 1.0)
        if not _is_number(temperature) or temperature <= 0:
            raise _fail(f"{where}.exit.temperature", "must be a finite number > 0")
        previous_output = outputs[0]["name"]
        previous_shape = outputs[0]["shape"]
    calibration = data.get("calibration")
    if calibration is not None and not isinstance(calibration, dict):
        raise _fail("calibration", "must be an object or null")


def _dims_match(declared: list, actual: Sequence[Any]) -> bool:
    """A declared shape matches a graph's: same rank, symbolic batch, equal fixed dims."""
    if len(declared) != len(actual):
        return False
    batch, *rest = actual
    return (batch is None or isinstance(batch, str)) and list(rest) == list(declared[1:])


def check_graph_io(
    file: str,
    expected_inputs: Sequence[dict],
    expected_outputs: Sequence[dict],
    inputs: Sequence[Any],
    outputs: Sequence[Any],
) -> None:
    """Check a loaded graph's inputs/outputs (objects with .name, .shape, .type, e.g. onnxruntime
    NodeArgs) against the manifest's tensors, in order; a tensor without "name" matches any name."""
    for kind, expected, actual in (("inputs", expected_inputs, inputs), ("outputs", expected_outputs, outputs)):
        if len(expected) != len(actual):
            raise BundleError(f"{file} has {len(actual)} {kind}, the manifest declares {len(expected)}")
        for want, got in zip(expected, actual):
            label = want.get("name", got.name)
            if got.name != label:
                raise BundleError(f"{file}: {kind[:-1]} '{got.name}' is declared as '{label}' in the manifest")
            if getattr(got, "type", GRAPH_DTYPE) != GRAPH_DTYPE:
                raise BundleError(f"{file}: {kind[:-1]} '{got.name}' has type {got.type}, expected {GRAPH_DTYPE}")
            if not _dims_match(want["shape"], list(got.shape)):
                raise BundleError(f"{file}: {kind[:-1]} '{got.name}' has shape {list(got.shape)}, the manifest declares {want['shape']}")


@dataclass(frozen=True)
class Manifest:
    """A validated manifest plus the folder it came from."""

    root: Path
    data: dict

    @property
    def input_spec(self) -> dict:
        return self.data["input"]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one input sample."""
        return tuple(self.data["input"]["shape"][1:])

    @property
    def num_classes(self) -> int:
        return self.data["num_classes"]

    @property
    def stages(self) -> list[dict]:
        return self.data["stages"]

    @property
    def exits(self) -> list[dict]:
        """Exit descriptions of the early stages, in order."""
        return [stage["exit"] for stage in self.stages[:-1]]

    @property
    def full_macs(self) -> int:
        return self.data["full"]["macs"]

    def exit_costs(self) -> list[float]:
        """Relative MACs spent by an input that leaves at each exit (last = final stage)."""
        return [stage["macs"]["cumulative"] / self.full_macs for stage in self.stages]

    def files(self) -> list[dict]:
        """Manifest entries (file, sha256) of every graph: the stages, then full.onnx."""
        return [*self.stages, self.data["full"]]

    def full_tensors(self) -> tuple[list[dict], list[dict]]:
        """What full.onnx must look like: the bundle's input in, [batch, num_classes] logits out."""
        spec = self.input_spec
        return [{"name": spec["name"], "shape": spec["shape"]}], [{"shape": [BATCH_DIM, self.num_classes]}]

    def path(self, name: str) -> Path:
        return self.root / name


def read_manifest(root: str | os.PathLike) -> dict:
    """Read manifest.json from a bundle folder as a dict, with BundleError on any failure."""
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
    root = Path(root)
    data = read_manifest(root)
    validate(data)
    manifest = Manifest(root=root, data=data)
    if check_hashes:
        for entry in manifest.files():
            check_file_hash(root, entry)
    return manifest


def check_file_hash(root: Path, entry: dict) -> None:
    """Refuse a graph file that is missing, unreadable or differs from its manifest sha256."""
    path = root / entry["file"]
    if not path.is_file():
        raise BundleError(f"bundle file missing: {path}")
    try:
        digest = sha256_file(path)
    except OSError as exc:
        raise BundleError(f"cannot read bundle file {path}: {exc.strerror or exc}") from None
    if digest != entry["sha256"]:
        raise BundleError(f"bundle file {path} does not match its sha256 in the manifest (tampered or corrupt)")


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to a temporary file in the same folder and rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_manifest(root: str | os.PathLike, data: dict) -> None:
    """Validate and atomically (re)write a bundle's manifest.json."""
    validate(data)
    write_json_atomic(Path(root) / MANIFEST_NAME, data)
