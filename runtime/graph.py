"""The cascade as one onnxruntime session: cascade.onnx decides every exit inside the graph."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from edgeexit.runtime.cascade import CascadeResult, CascadeRunner, Runner, check_batch
from edgeexit.runtime.cascade_bytes import tunable_cascade_bytes
from edgeexit.errors import BundleError, ConfigError, first_line
from edgeexit.runtime.manifest import CASCADE_NAME, CASCADE_OUTPUTS, Manifest, VECTORS_INPUT, load_manifest
from edgeexit.runtime.profiles import ENGINES
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
