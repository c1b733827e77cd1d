"""The early-exit cascade on onnxruntime: one session per stage, survivors compacted per exit."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import onnxruntime as ort

from edgeexit.errors import BundleError, ConfigError, InputError, first_line
from edgeexit.runtime.manifest import FULL_NAME, Manifest, StageSpec, TensorSpec, load_manifest
from edgeexit.runtime.policies import Policy, ensembled, get_policy, per_exit_args, policies_for
from edgeexit.runtime.providers import resolve_providers
from edgeexit.runtime.schema import BATCH_DIM

DEFAULT_CHUNK = 256
GRAPH_DTYPE = "tensor(float)"


@dataclass
class CascadeResult:
    """Per-input predictions and the exit each input left at (last index = final stage)."""

    predictions: np.ndarray
    exit_index: np.ndarray
    num_stages: int

    def exit_counts(self) -> list[int]:
        return np.bincount(self.exit_index, minlength=self.num_stages).tolist()


def session_options(threads: int | None) -> ort.SessionOptions:
    """Session options shared by every graph: full graph optimization, fixed thread count."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Each stage session owns an intra-op pool; a finished stage's threads must stop spinning
    # or they burn the cores the next stage needs (measured: no-exit cascade 4.7x full at 2 threads).
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


def check_batch(x: object, input_shape: Sequence[int]) -> np.ndarray:
    """Validate a model-ready batch: float32 ndarray (N, C, H, W), N >= 1, finite values."""
    if not isinstance(x, np.ndarray):
        raise InputError(f"input must be a numpy array, got {type(x).__name__}")
    expected = tuple(input_shape)
    if x.dtype != np.float32:
        raise InputError(f"input dtype must be float32, got {x.dtype} (convert with x.astype(np.float32))")
    if x.ndim != 4:
        raise InputError(f"input must have shape (N, {', '.join(map(str, expected))}), got rank {x.ndim} {x.shape}")
    if tuple(x.shape[1:]) != expected:
        raise InputError(f"input sample shape must be {expected}, got {tuple(x.shape[1:])}")
    if x.shape[0] == 0:
        raise InputError("input batch is empty")
    for start in range(0, len(x), DEFAULT_CHUNK):  # chunked so a huge batch needs no full-size mask
        finite = np.isfinite(x[start : start + DEFAULT_CHUNK]).all(axis=(1, 2, 3))
        if not finite.all():
            raise InputError(f"input sample {start + int(np.argmin(finite))} contains NaN or infinite values")
    return np.ascontiguousarray(x)


def _dims_match(declared: Sequence[object], actual: Sequence[object]) -> bool:
    """A declared shape matches a graph's: same rank, the same batch (symbolic, or the static int), equal other dims."""
    if len(declared) != len(actual):
        return False
    batch, *rest = actual
    symbolic = batch is None or isinstance(batch, str)
    same_batch = symbolic if declared[0] == BATCH_DIM else batch == declared[0]
    return same_batch and list(rest) == list(declared[1:])


def check_graph_io(file: str, expected_inputs: Sequence[TensorSpec], expected_outputs: Sequence[TensorSpec],
                   inputs: Sequence[object], outputs: Sequence[object]) -> None:
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


def make_policy(stage: StageSpec, num_classes: int, kind: str | None = None, policy_args: dict | None = None) -> Policy:
    """One early stage's policy: the manifest's, or `kind` instead (its default threshold unless it is the manifest's kind).

    The exit's temperature comes from the manifest either way. A `kind` whose outputs the exit
    lacks is a ConfigError (the user asked for it); a manifest policy that lacks them is a BundleError.
    """
    spec = stage.exit.policy
    own = kind is None or kind == spec.kind
    cls = get_policy(spec.kind if own else kind)
    missing = set(cls.roles) - set(stage.exit.outputs)
    if missing:
        if kind is None:
            raise BundleError(f"policy '{cls.name}' needs exit outputs {sorted(missing)} the bundle lacks")
        raise ConfigError(f"--policy {cls.name} needs exit outputs {sorted(missing)}; this bundle's exits output "
                          f"{', '.join(stage.exit.outputs)} (policies it can run: {', '.join(policies_for(stage.exit.outputs))})")
    policy = cls(spec.threshold if own else cls.default_threshold, {**(spec.args if own else {}), **(policy_args or {})},
                 stage.exit.temperature)
    policy.check_outputs(stage, num_classes)
    return policy


def manifest_policies(manifest: Manifest, kind: str | None = None, policy_args: dict | None = None,
                      ensemble: str | None = None) -> list[Policy]:
    """Every exit's policy (make_policy), with the manifest's ensemble at deferral or `ensemble` instead."""
    num_exits = len(manifest.exits)
    policies = [make_policy(stage, manifest.num_classes, kind, per_exit_args(policy_args or {}, index, num_exits))
                for index, stage in enumerate(manifest.stages[:-1])]
    return ensembled(policies, [e.policy for e in manifest.exits], ensemble)


class Runner:
    """What every engine shares: the manifest, providers, exit policies and thresholds, full.onnx."""

    engine = ""

    def __init__(
        self,
        bundle: str | os.PathLike | Manifest,
        device: str = "cpu",
        threads: int | None = None,
        thresholds: float | Sequence[float] | None = None,
        policy_args: dict | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        policy: str | None = None,
        ensemble: str | None = None,
    ) -> None:
        self.manifest = bundle if isinstance(bundle, Manifest) else load_manifest(bundle)
        self.device = device
        self.threads = threads
        self.chunk_size = chunk_size
        self.providers = resolve_providers(device, cache_dir=self.manifest.root / "cache")
        self._options = session_options(threads)
        self._full: ort.InferenceSession | None = None
        self.policies = manifest_policies(self.manifest, policy, policy_args, ensemble)
        if thresholds is not None:
            self.set_thresholds(thresholds)

    def _load(self, name: str, content: bytes | None = None) -> ort.InferenceSession:
        """An onnxruntime session for one graph of the bundle (or `content`, an in-memory edit of it), BundleError if it cannot load."""
        path = self.manifest.path(name)
        try:
            return ort.InferenceSession(str(path) if content is None else content, self._options, providers=self.providers)
        except Exception as exc:  # onnxruntime raises several private exception types
            raise BundleError(f"onnxruntime cannot load {path}: {first_line(exc)}") from None

    def _session(self, name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> ort.InferenceSession:
        """A session for one graph, refused unless its inputs/outputs match the manifest's."""
        session = self._load(name)
        check_graph_io(name, inputs, outputs, session.get_inputs(), session.get_outputs())
        return session

    @property
    def num_exits(self) -> int:
        return len(self.policies)

    @property
    def num_stages(self) -> int:
        return len(self.manifest.stages)

    @property
    def thresholds(self) -> list[float]:
        return [p.threshold for p in self.policies]

    def policies_at(self, thresholds: float | Sequence[float]) -> list[Policy]:
        """Copies of the exit policies at other thresholds (one for all exits, or one per exit)."""
        values = [thresholds] * self.num_exits if np.isscalar(thresholds) else list(thresholds)
        if len(values) != self.num_exits:
            raise ConfigError(f"got {len(values)} thresholds for {self.num_exits} exits")
        return [dataclasses.replace(policy, threshold=value) for policy, value in zip(self.policies, values)]

    def set_thresholds(self, thresholds: float | Sequence[float]) -> None:
        """Change the exit thresholds (one for all exits, or one per exit); no reload. The policy list is
        swapped whole, so a predict running in another thread keeps the list it started with."""
        self.policies = self.policies_at(thresholds)

    def full_session(self) -> ort.InferenceSession:
        """The session of full.onnx (the plain backbone), created on first use."""
        if self._full is None:
            self._full = self._session(FULL_NAME, *self.manifest.full_tensors())
        return self._full

    def _run(self, session: ort.InferenceSession, outputs: list[str] | None, input_name: str, x: np.ndarray) -> list[np.ndarray]:
        """One session run, or for a static-batch bundle one run per N inputs with the last group zero-padded."""
        static = self.manifest.static_batch
        if static is None or len(x) == static:
            return session.run(outputs, {input_name: x})
        parts = []
        for start in range(0, len(x), static):
            group = x[start : start + static]
            if len(group) < static:
                group = np.concatenate([group, np.zeros((static - len(group), *group.shape[1:]), group.dtype)])
            parts.append(session.run(outputs, {input_name: group}))
        return [np.concatenate([part[i] for part in parts])[: len(x)] for i in range(len(parts[0]))]

    def predict_full(self, x: np.ndarray) -> np.ndarray:
        """Logits of full.onnx for a batch: the no-early-exit baseline."""
        x = check_batch(x, self.manifest.input_shape)
        session = self.full_session()
        name = session.get_inputs()[0].name
        return np.concatenate([self._run(session, None, name, x[i : i + self.chunk_size])[0] for i in range(0, len(x), self.chunk_size)])

    def relative_macs(self, result: CascadeResult) -> float:
        """Average MACs spent per input relative to full.onnx."""
        costs = np.asarray(self.manifest.exit_costs())
        return float(costs[result.exit_index].mean())


class CascadeRunner(Runner):
    """Runs a bundle's stages in order and stops each input at its first accepted exit (the stage chain).

    >>> runner = CascadeRunner("bundle/", device="cpu")
    >>> result = runner.predict(batch)          # float32 (N, C, H, W), normalized
    >>> result.predictions, result.exit_index
    """

    engine = "chain"

    def __init__(self, bundle: str | os.PathLike | Manifest, device: str = "cpu", **options) -> None:
        super().__init__(bundle, device, **options)
        self.sessions = [self._session(stage.file, stage.inputs, stage.outputs) for stage in self.manifest.stages]
        self.output_names = [stage.output_names for stage in self.manifest.stages]
        self._input_names = [stage.inputs[0].name for stage in self.manifest.stages]
        self._reads_input = [stage.reads_input for stage in self.manifest.stages]
        self._positions = [list(stage.exit_positions.items()) for stage in self.manifest.stages[:-1]]
        # the no-exit path starts at the last stage that reads the input (earlier whole models cannot change it)
        self._no_exit_start = max(i for i, reads in enumerate(self._reads_input) if reads)
        self._input_later = [any(self._reads_input[index + 1 :]) for index in range(len(self._reads_input))]
        # called with (exit index, policy, outputs of the inputs reaching that exit) on every chunk: the drift guard's hook
        self.observer: Callable[[int, Policy, dict[str, np.ndarray]], None] | None = None

    @property
    def active_providers(self) -> list[str]:
        return self.sessions[0].get_providers()

    def run_stage(self, index: int, x: np.ndarray) -> list[np.ndarray]:
        """Stage `index` on its input; outputs in manifest order."""
        return self._run(self.sessions[index], self.output_names[index], self._input_names[index], x)

    def _exit_outputs(self, index: int, outputs: list[np.ndarray]) -> dict[str, np.ndarray]:
        return {role: outputs[position] for role, position in self._positions[index]}

    def feed(self, index: int, x: np.ndarray, features: np.ndarray | None) -> np.ndarray:
        """What stage `index` reads: the rows `x` of the input, or `features`, the previous stage's first output."""
        return x if self._reads_input[index] else features

    def stage_feeds(self, x: np.ndarray) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
        """Every stage on all of `x` (no exiting), in order: (what the stage reads, its outputs)."""
        features = None
        for index in range(len(self.sessions)):
            stage_input = self.feed(index, x, features)
            outputs = self.run_stage(index, stage_input)
            yield stage_input, outputs
            features = outputs[0]

    def predict(self, x: np.ndarray, use_exits: bool = True,
                thresholds: float | Sequence[float] | None = None) -> CascadeResult:
        """Predict a batch; large batches run in chunks so memory stays bounded. `thresholds` apply to
        this call only (threads sharing a runner may each pass their own), else the runner's are used."""
        x = check_batch(x, self.manifest.input_shape)
        policies = self.policies if thresholds is None else self.policies_at(thresholds)
        if len(x) <= self.chunk_size:
            return self._predict_chunk(x, policies if use_exits else [])
        parts = [self._predict_chunk(x[i : i + self.chunk_size], policies if use_exits else [])
                 for i in range(0, len(x), self.chunk_size)]
        return CascadeResult(
            np.concatenate([p.predictions for p in parts]),
            np.concatenate([p.exit_index for p in parts]),
            len(self.sessions),
        )

    def _predict_chunk(self, x: np.ndarray, policies: Sequence[Policy]) -> CascadeResult:
        """The cascade on one chunk (no policies: no exits). Index bookkeeping starts only once some input
        exits, so the path where nothing exits (every hard input, and batch size 1 until it leaves) costs
        the session runs and the policy decisions only."""
        n = len(x)
        last = len(self.sessions) - 1
        exit_index = np.full(n, last, dtype=np.int64)
        features = rows = x  # rows: the input rows of the inputs still in the cascade
        if not policies:
            for index in range(self._no_exit_start, last):
                features = self.run_stage(index, self.feed(index, x, features))[0]
            logits = self.run_stage(last, self.feed(last, x, features))[0]
            return CascadeResult(logits.argmax(axis=1), exit_index, last + 1)
        predictions = np.empty(n, dtype=np.int64)
        alive: np.ndarray | None = None  # indices of the survivors once some input has left
        state = policies[0].start(n, self.manifest.num_classes)
        for index, policy in enumerate(policies):
            outputs = self.run_stage(index, self.feed(index, rows, features))
            exit_outputs = self._exit_outputs(index, outputs)
            if self.observer is not None:
                self.observer(index, policy, exit_outputs)
            exits, preds, state = policy.decide(exit_outputs, state)
            features = outputs[0]
            if not exits.any():
                continue
            leaving = np.flatnonzero(exits) if alive is None else alive[exits]
            predictions[leaving] = preds[exits]
            exit_index[leaving] = index
            keep = ~exits
            if not keep.any():
                return CascadeResult(predictions, exit_index, last + 1)
            alive = np.flatnonzero(keep) if alive is None else alive[keep]
            features = features[keep]  # a whole model's logits when its stage has no features: never read
            rows = x[alive] if self._input_later[index] else rows
            state = None if state is None else state[keep]
        final = policies[-1].final(self.run_stage(last, self.feed(last, rows, features))[0], state)
        if alive is None:
            return CascadeResult(final, exit_index, last + 1)
        predictions[alive] = final
        return CascadeResult(predictions, exit_index, last + 1)

    def stage_outputs(self, x: np.ndarray) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
        """Every exit's outputs and the final logits for all inputs (no exiting): for calibration."""
        x = check_batch(x, self.manifest.input_shape)
        exits: list[list[dict[str, np.ndarray]]] = [[] for _ in self.policies]
        finals = []
        for start in range(0, len(x), self.chunk_size):
            *early, (_, final) = self.stage_feeds(x[start : start + self.chunk_size])
            for index, (_, outputs) in enumerate(early):
                exits[index].append(self._exit_outputs(index, outputs))
            finals.append(final[0])
        merged = [{role: np.concatenate([part[role] for part in parts]) for role in parts[0]} for parts in exits]
        return merged, np.concatenate(finals)
