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
from edgeexit.runtime.manifest import CASCADE_NAME, CASCADE_OUTPUTS, ENGINES, Manifest, load_manifest, sha256_file
from edgeexit.runtime.policies import Policy

ONNX_DTYPES = {"float32": "tensor(float)", "float64": "tensor(double)", "int64": "tensor(int64)"}


class GraphRunner(Runner):
    """Runs cascade.onnx: one session run per batch, thresholds (and beta, temperature) fed as graph inputs.

    Decisions equal CascadeRunner's (export and `edgeexit verify` check it).
    """

    engine = "graph"

    def __init__(self, bundle: str | os.PathLike | Manifest, device: str = "cpu", **options) -> None:
        super().__init__(bundle, device, **options)
        entry = self.manifest.cascade
        if entry is None:
            raise BundleError(f"{self.manifest.root} has no {CASCADE_NAME} (exported by an older edgeexit): re-export it, or use --engine chain")
        self.session = self._load(CASCADE_NAME)
        # the per-exit inputs have defaults: onnxruntime lists them as overridable initializers, not inputs
        inputs = [*self.session.get_inputs(), *self.session.get_overridable_initializers()]
        for kind, declared, actual in (("inputs", entry.inputs, inputs), ("outputs", entry.outputs, self.session.get_outputs())):
            got = [(a.name, a.type) for a in actual]
            want = [(t.name, ONNX_DTYPES[t.dtype]) for t in declared]
            if got != want:
                raise BundleError(f"{CASCADE_NAME}: graph {kind} {got} differ from the manifest's {want}")
        self._input_name = entry.inputs[0].name
        self._vector_inputs = [t.name for t in entry.inputs[1:]]
        if self.manifest.static_batch is not None:  # a fixed-shape graph (only batch 1 has one) takes that many per run
            self.chunk_size = self.manifest.static_batch

    @property
    def active_providers(self) -> list[str]:
        return self.session.get_providers()

    def feeds(self, policies: Sequence[Policy] | None = None) -> dict[str, np.ndarray]:
        """The per-exit graph inputs (float64 vectors) for these policies (default: the runner's)."""
        policies = self.policies if policies is None else policies
        values = {
            "thresholds": [p.threshold for p in policies],
            "beta": [p.args.get("beta", 0.0) for p in policies],
            "temperature": [getattr(p, "temperature", 1.0) for p in policies],
        }
        return {name: np.asarray(values[name], dtype=np.float64) for name in self._vector_inputs}

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
        feeds = self.feeds(None if thresholds is None else self.policies_at(thresholds))
        wanted = list(CASCADE_OUTPUTS[1:])  # prediction, exit_index: the scores stay in the session
        parts = [self._run_cascade(wanted, x[i : i + self.chunk_size], feeds) for i in range(0, len(x), self.chunk_size)]
        if len(parts) == 1:
            return CascadeResult(*parts[0], self.num_stages)
        return CascadeResult(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), self.num_stages)


def auto_engine(manifest: Manifest) -> str:
    """The engine `--engine auto` picks for a bundle: graph when it has cascade.onnx, else chain."""
    return "chain" if manifest.cascade is None else "graph"


def open_runner(bundle: str | os.PathLike | Manifest, engine: str = "auto", device: str = "cpu", **options) -> Runner:
    """A runner for `engine`: graph (cascade.onnx), chain (one session per stage), or auto (graph when the bundle has it)."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine '{engine}'; choose from: {', '.join(ENGINES)}")
    manifest = bundle if isinstance(bundle, Manifest) else load_manifest(bundle)
    if options.get("policy") is not None:  # cascade.onnx has the manifest's policies compiled in
        if engine == "graph":
            raise ConfigError("--policy needs the stage-chain engine (--engine chain or auto): cascade.onnx runs the manifest's policies")
        engine = "chain"
    if (auto_engine(manifest) if engine == "auto" else engine) == "chain":
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


def with_graph_defaults(manifest: Manifest, name: str, values: Sequence[float]) -> Manifest:
    """Rewrite the default of cascade.onnx's per-exit input `name` (thresholds, beta, temperature) in the
    file; returns the manifest with the new default and sha256 (the caller saves it). Unchanged for
    bundles without cascade.onnx or without that input.

    Runs without the onnx package: the default is a float64 initializer stored as name + raw
    little-endian bytes, replaced where that byte sequence occurs exactly once (else BundleError)."""
    entry = manifest.cascade
    default = None if entry is None else entry.default(name)
    if default is None:
        return manifest
    if len(values) != len(default):
        raise ConfigError(f"{CASCADE_NAME} input '{name}' takes {len(default)} values, got {len(values)}")
    old, new = _initializer_bytes(name, default), _initializer_bytes(name, values)
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
    inputs = tuple(dataclasses.replace(t, default=tuple(float(v) for v in values)) if t.name == name else t for t in entry.inputs)
    return dataclasses.replace(manifest, cascade=dataclasses.replace(entry, inputs=inputs, sha256=sha256_file(path)))
