"""The cascade as one onnxruntime session: cascade.onnx decides every exit inside the graph."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeexit.runtime.cascade import CascadeResult, CascadeRunner, Runner
from edgeexit.errors import BundleError, ConfigError, first_line
from edgeexit.runtime.manifest import CASCADE_NAME, CASCADE_OUTPUTS, Manifest, load_manifest, sha256_file

ENGINES = ("auto", "graph", "chain")
ONNX_DTYPES = {"float32": "tensor(float)", "float64": "tensor(double)", "int64": "tensor(int64)"}


class GraphRunner(Runner):
    """Runs cascade.onnx: one session run per batch, thresholds (and beta) fed as graph inputs.

    Decisions equal CascadeRunner's (export and `edgeexit verify` check it).
    """

    engine = "graph"

    def __init__(self, bundle: str | os.PathLike | Manifest, device: str = "cpu", **options) -> None:
        super().__init__(bundle, device, **options)
        entry = self.manifest.cascade
        if entry is None:
            raise BundleError(f"{self.manifest.root} has no {CASCADE_NAME} (exported by an older edgeexit): re-export it, or use --engine chain")
        self.session = self._load(CASCADE_NAME)
        # thresholds and beta have defaults: onnxruntime lists them as overridable initializers, not inputs
        inputs = [*self.session.get_inputs(), *self.session.get_overridable_initializers()]
        for kind, declared, actual in (("inputs", entry["inputs"], inputs), ("outputs", entry["outputs"], self.session.get_outputs())):
            got = [(a.name, a.type) for a in actual]
            want = [(t["name"], ONNX_DTYPES[t["dtype"]]) for t in declared]
            if got != want:
                raise BundleError(f"{CASCADE_NAME}: graph {kind} {got} differ from the manifest's {want}")
        self._input_name = entry["inputs"][0]["name"]
        self._vector_inputs = [t["name"] for t in entry["inputs"][1:]]

    @property
    def active_providers(self) -> list[str]:
        return self.session.get_providers()

    def feeds(self) -> dict[str, np.ndarray]:
        """The per-exit graph inputs (float64 vectors) for the current thresholds, beta and temperatures."""
        values = {
            "thresholds": self.thresholds,
            "beta": [p.args.get("beta", 0.0) for p in self.policies],
            "temperature": [getattr(p, "temperature", 1.0) for p in self.policies],
        }
        return {name: np.asarray(values[name], dtype=np.float64) for name in self._vector_inputs}

    def run_graph(self, x: np.ndarray, feeds: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
        """One session run: (scores, prediction, exit_index) for a checked batch; `feeds` overrides inputs."""
        inputs = {self._input_name: x, **self.feeds(), **(feeds or {})}
        for name in self._vector_inputs:
            if np.shape(inputs[name]) != (self.num_exits,):
                raise ConfigError(f"{CASCADE_NAME} input '{name}' takes {self.num_exits} values (one per exit), got shape {np.shape(inputs[name])}")
        try:
            return self.session.run(list(CASCADE_OUTPUTS), inputs)
        except Exception as exc:  # inputs are checked: a failing run is a broken graph (onnxruntime's own error types)
            raise BundleError(f"{CASCADE_NAME} failed to run: {first_line(exc)}") from None

    def _predict_chunk(self, x: np.ndarray) -> CascadeResult:
        _, predictions, exit_index = self.run_graph(x)
        return CascadeResult(predictions, exit_index, self.num_stages)


def open_runner(bundle: str | os.PathLike | Manifest, engine: str = "auto", device: str = "cpu", **options) -> Runner:
    """A runner for `engine`: graph (cascade.onnx), chain (one session per stage), or auto (graph when the bundle has it)."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine '{engine}'; choose from: {', '.join(ENGINES)}")
    manifest = bundle if isinstance(bundle, Manifest) else load_manifest(bundle)
    if engine == "chain" or (engine == "auto" and manifest.cascade is None):
        return CascadeRunner(manifest, device, **options)
    return GraphRunner(manifest, device, **options)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _initializer_bytes(name: str, values: Sequence[float]) -> bytes:
    """How onnx serializes the tail of a float64 initializer: field 8 (name), then field 9 (raw_data)."""
    raw = np.asarray(values, dtype="<f8").tobytes()
    encoded = name.encode()
    return b"\x42" + _varint(len(encoded)) + encoded + b"\x4a" + _varint(len(raw)) + raw


def set_graph_defaults(manifest: Manifest, name: str, values: Sequence[float]) -> None:
    """Rewrite the default of cascade.onnx's per-exit input `name` (thresholds, beta, temperature) in
    place, in the file and in manifest.data (the caller saves the manifest); a no-op for bundles
    without cascade.onnx or without that input.

    Runs without the onnx package: the default is a float64 initializer stored as name + raw
    little-endian bytes, replaced where that byte sequence occurs exactly once (else BundleError)."""
    entry = manifest.cascade
    spec = None if entry is None else next((t for t in entry["inputs"] if t["name"] == name), None)
    if spec is None:
        return
    if len(values) != len(spec["default"]):
        raise ConfigError(f"{CASCADE_NAME} input '{name}' takes {len(spec['default'])} values, got {len(values)}")
    old, new = _initializer_bytes(name, spec["default"]), _initializer_bytes(name, values)
    path = manifest.path(CASCADE_NAME)
    content = path.read_bytes()
    if content.count(old) != 1:
        raise BundleError(f"cannot locate the default {name} in {path}; re-export the bundle")
    fd, tmp = tempfile.mkstemp(prefix=f".{CASCADE_NAME}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(content.replace(old, new))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    spec["default"] = [float(v) for v in values]
    entry["sha256"] = sha256_file(path)
