"""The cascade as one onnxruntime session: cascade.onnx decides every exit inside the graph."""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeexit.runtime.cascade import CascadeResult, CascadeRunner, Runner, check_batch
from edgeexit.errors import BundleError, ConfigError, first_line
from edgeexit.runtime.manifest import CASCADE_NAME, CASCADE_OUTPUTS, CascadeGraph, Manifest, VECTORS_INPUT, load_manifest
from edgeexit.runtime.profiles import ENGINES
from edgeexit.runtime.files import sha256_file
from edgeexit.runtime.policies import GRAPH_VECTORS, Policy, manifest_ensemble

ONNX_DTYPES = {"float32": "tensor(float)", "float64": "tensor(double)", "int64": "tensor(int64)"}


class GraphRunner(Runner):
    """Runs cascade.onnx: one session run per batch, thresholds (and beta, temperature) fed as graph inputs.

    Decisions equal CascadeRunner's (export and `edgeexit verify` check it).
    """

    engine = "graph"

    def __init__(self, bundle: str | os.PathLike | Manifest, device: str = "cpu", batch_size: int | None = None,
                 **options) -> None:
        """`batch_size` 1 runs cascade_b1.onnx when the bundle has it (the batch-1 graph, cheaper for one input per
        call); otherwise cascade.onnx, which takes any batch."""
        super().__init__(bundle, device, **options)
        entry = self.manifest.cascade_for(batch_size)
        if entry is None and not self.manifest.exits:
            raise BundleError(f"{self.manifest.root} is a static network (no exit) and has no {CASCADE_NAME}: use --engine chain")
        if entry is None:
            raise BundleError(f"{self.manifest.root} has no {CASCADE_NAME} (exported by an older edgeexit): re-export it, or use --engine chain")
        self.graph = entry
        # the per-exit vectors as graph inputs: moved there in memory when the file holds them as constants
        self.session = self._load(entry.file, None if entry.vectors == VECTORS_INPUT else tunable_cascade_bytes(self.manifest, entry))
        # older bundles: the per-exit inputs have defaults, which onnxruntime lists as overridable initializers
        inputs = [*self.session.get_inputs(), *self.session.get_overridable_initializers()]
        for kind, declared, actual in (("inputs", entry.inputs, inputs), ("outputs", entry.outputs, self.session.get_outputs())):
            got = [(a.name, a.type) for a in actual]
            want = [(t.name, ONNX_DTYPES[t.dtype]) for t in declared]
            if got != want:
                raise BundleError(f"{CASCADE_NAME}: graph {kind} {got} differ from the manifest's {want}")
        self._input_name = entry.inputs[0].name
        self._vector_inputs = [t.name for t in entry.inputs[1:]]
        if isinstance(entry.inputs[0].shape[0], int):  # a fixed-shape graph (only batch 1 has one) takes that many per run
            self.chunk_size = entry.inputs[0].shape[0]
        self._last_feeds: tuple | None = None  # (policies, thresholds, feeds) of the latest predict call

    @property
    def active_providers(self) -> list[str]:
        return self.session.get_providers()

    def feeds(self, policies: Sequence[Policy] | None = None) -> dict[str, np.ndarray]:
        """The per-exit graph inputs (float64 vectors) for these policies (default: the runner's)."""
        policies = self.policies if policies is None else policies
        return {name: np.array([GRAPH_VECTORS[name](p) for p in policies], dtype=np.float64) for name in self._vector_inputs}

    def _call_feeds(self, thresholds: float | Sequence[float] | None) -> dict[str, np.ndarray]:
        """feeds() for a predict call (the runner's policies, or copies at `thresholds`), reused while calls repeat
        the same thresholds on the same policies (run, a profile, a sweep): building them costs tens of
        microseconds, several points of a small model's batch-1 call. One tuple, swapped whole: safe across threads."""
        policies, key = self.policies, thresholds if thresholds is None or np.isscalar(thresholds) else tuple(thresholds)
        last = self._last_feeds
        if last is None or last[0] is not policies or last[1] != key:
            last = (policies, key, self.feeds(None if thresholds is None else self.policies_at(thresholds)))
            self._last_feeds = last
        return last[2]

    def run_graph(self, x: np.ndarray, feeds: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
        """One session run: (scores, prediction, exit_index) for a checked batch; `feeds` overrides inputs."""
        inputs = {**self.feeds(), **(feeds or {})}
        for name in self._vector_inputs:
            if np.shape(inputs[name]) != (self.num_exits,):
                raise ConfigError(f"{CASCADE_NAME} input '{name}' takes {self.num_exits} values (one per exit), got shape {np.shape(inputs[name])}")
        return self._run_cascade(list(CASCADE_OUTPUTS), x, inputs)

    def _run_cascade(self, outputs: list[str], x: np.ndarray, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self.session.run(outputs, {self._input_name: x, **feeds})
        except Exception as exc:  # inputs are checked: a failing run is a broken graph (onnxruntime's own error types)
            raise BundleError(f"{CASCADE_NAME} failed to run: {first_line(exc)}") from None

    def predict(self, x: np.ndarray, thresholds: float | Sequence[float] | None = None) -> CascadeResult:
        """Predict a batch in one session run per chunk; `thresholds` apply to this call only."""
        x = check_batch(x, self.manifest.input_shape)
        feeds = self._call_feeds(thresholds)
        wanted = list(CASCADE_OUTPUTS[1:])  # prediction, exit_index: the scores stay in the session
        parts = [self._run_cascade(wanted, x[i : i + self.chunk_size], feeds) for i in range(0, len(x), self.chunk_size)]
        if len(parts) == 1:
            return CascadeResult(*parts[0], self.num_stages)
        return CascadeResult(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), self.num_stages)


def auto_engine(manifest: Manifest) -> str:
    """The engine `--engine auto` picks for a bundle: graph when it has cascade.onnx, else chain.

    The graph engine runs cascade_b1.onnx for calls of one input when the bundle has it (GraphRunner,
    Manifest.cascade_for): export writes that batch-1 graph beside cascade.onnx because the runtime cannot
    build graphs (it has no onnx package), and at batch 1 it costs a few points of full.onnx less than the
    compacting graph (benchmarks/README.md). Profiles of the graph engine at batch 1 time it too."""
    return "chain" if manifest.cascade is None else "graph"


def open_runner(bundle: str | os.PathLike | Manifest, engine: str = "auto", device: str = "cpu",
                batch_size: int | None = None, **options) -> Runner:
    """A runner for `engine`: graph (cascade.onnx, or cascade_b1.onnx when `batch_size` is 1), chain (one session
    per stage), or auto (graph when the bundle has it)."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine '{engine}'; choose from: {', '.join(ENGINES)}")
    manifest = bundle if isinstance(bundle, Manifest) else load_manifest(bundle)
    own_ensemble = manifest_ensemble([e.policy for e in manifest.exits])[0]
    for option in ("policy", "ensemble"):  # cascade.onnx has the manifest's policies and ensemble compiled in
        if options.get(option) is not None and (option == "policy" or options[option] != own_ensemble):
            if engine == "graph":
                raise ConfigError(f"--{option} needs the stage-chain engine (--engine chain or auto): cascade.onnx runs "
                                  f"the manifest's policies")
            engine = "chain"
    if (auto_engine(manifest) if engine == "auto" else engine) == "chain":
        return CascadeRunner(manifest, device, **options)
    return GraphRunner(manifest, device, batch_size, **options)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def _fields(buf: bytes) -> list[tuple[int, bytes, bytes]]:
    """A protobuf message's top-level fields in order: (field number, the field's bytes with its key, payload of a
    length-delimited field or b"")."""
    fields, pos = [], 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        wire, payload = key & 7, b""
        if wire == 0:
            _, pos = _read_varint(buf, pos)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        elif wire == 2:
            size, pos = _read_varint(buf, pos)
            payload, pos = buf[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated field")
        fields.append((key >> 3, buf[start:pos], payload))
    return fields


def _message(number: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes or message) `number`."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _double_vector_input(name: str, size: int) -> bytes:
    """GraphProto.input (field 11): ValueInfoProto name, TypeProto.tensor_type {elem_type DOUBLE (11), shape [size]}."""
    dim = _message(1, b"\x08" + _varint(size))  # TensorShapeProto.dim { dim_value }
    tensor = b"\x08\x0b" + _message(2, dim)
    return _message(11, _message(1, name.encode()) + _message(2, _message(1, tensor)))


def tunable_cascade_bytes(manifest: Manifest, entry: CascadeGraph | None = None) -> bytes:
    """cascade.onnx (or `entry`'s graph) with its per-exit vectors (thresholds, beta, temperature) as required float64
    graph inputs.

    The file stores them as constants (so a bare session loads without warnings and runs on the image alone);
    this copy, made without the onnx package by editing the protobuf fields of the model's graph (drop those
    initializers, append a graph input per vector after the image), is what GraphRunner and the web page run
    and feed. Files of older bundles already take them as inputs and come back unchanged."""
    entry = manifest.cascade if entry is None else entry
    if entry is None:
        raise BundleError(f"{manifest.root} has no {CASCADE_NAME} (exported by an older edgeexit): re-export it")
    path = manifest.path(entry.file)
    content = path.read_bytes()
    if entry.vectors == VECTORS_INPUT:
        return content
    vectors = {t.name: t for t in entry.inputs[1:]}
    try:
        model = _fields(content)
        graphs = [i for i, (number, _, _) in enumerate(model) if number == 7]  # ModelProto.graph
        if len(graphs) != 1:
            raise ValueError("no single graph")
        kept, found, last_input = [], set(), None
        for number, raw, payload in _fields(model[graphs[0]][2]):
            if number == 5:  # GraphProto.initializer; TensorProto.name is field 8
                name = next((p.decode() for n, _, p in _fields(payload) if n == 8), None)
                if name in vectors:
                    found.add(name)
                    continue
            if number == 11:
                last_input = len(kept)
            kept.append(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not a readable ONNX model ({exc}); re-export the bundle") from None
    if found != set(vectors) or last_input is None:
        raise BundleError(f"{path} lacks the constants {sorted(set(vectors) - found)} its manifest lists; re-export the bundle")
    kept[last_input + 1 : last_input + 1] = [_double_vector_input(t.name, len(t.default)) for t in vectors.values()]
    graph = _message(7, b"".join(kept))
    return b"".join(graph if i == graphs[0] else raw for i, (_, raw, _) in enumerate(model))


def _initializer_bytes(name: str, values: Sequence[float]) -> bytes:
    """How onnx serializes the tail of a float64 initializer: field 8 (name), then field 9 (raw_data)."""
    raw = np.asarray(values, dtype="<f8").tobytes()
    encoded = name.encode()
    return b"\x42" + _varint(len(encoded)) + encoded + b"\x4a" + _varint(len(raw)) + raw


def with_graph_defaults(manifest: Manifest, name: str, values: Sequence[float]) -> Manifest:
    """Rewrite the default of per-exit input `name` (thresholds, beta, temperature) in every cascade graph file
    (cascade.onnx, cascade_b1.onnx); returns the manifest with the new defaults and sha256s (the caller saves it).
    Unchanged for bundles without those graphs or without that input.

    Runs without the onnx package: the default is a float64 initializer stored as name + raw
    little-endian bytes, replaced where that byte sequence occurs exactly once (else BundleError)."""
    for field in ("cascade", "cascade_b1"):
        entry = getattr(manifest, field)
        default = None if entry is None else entry.default(name)
        if default is None:
            continue
        if len(values) != len(default):
            raise ConfigError(f"{entry.file} input '{name}' takes {len(default)} values, got {len(values)}")
        old, new = _initializer_bytes(name, default), _initializer_bytes(name, values)
        path = manifest.path(entry.file)
        content = path.read_bytes()
        if content.count(old) != 1:
            raise BundleError(f"cannot locate the default {name} in {path}; re-export the bundle")
        fd, tmp = tempfile.mkstemp(prefix=f".{entry.file}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(content.replace(old, new))
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        inputs = tuple(dataclasses.replace(t, default=tuple(float(v) for v in values)) if t.name == name else t for t in entry.inputs)
        manifest = dataclasses.replace(manifest, **{field: dataclasses.replace(entry, inputs=inputs, sha256=sha256_file(path))})
    return manifest
