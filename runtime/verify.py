"""Bundle self-check for `edgeexit verify`: schema, sha256 of every graph, ONNX checker, chain vs full.

Runs on the device (no torch). The ONNX checker needs the `onnx` package, which a runtime-only
install lacks: it is then reported as skipped, not failed, because onnxruntime parses and
validates every graph when the sessions are created, which the graph and chain checks do anyway.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from edgeexit.runtime.cascade import CascadeRunner
from edgeexit.errors import ConfigError, EdgeExitError, VerificationError, first_line
from edgeexit.runtime.graph import GraphRunner
from edgeexit.runtime.manifest import CASCADE_NAME, FORMAT_VERSION, Manifest, check_file_hash, load_manifest

OK, FAIL, SKIP = "ok", "FAIL", "skip"
TOLERANCE = 1e-4
# int8 bundles: full.onnx and the stages are quantized as separate graphs, so the chain and full.onnx
# round different tensors (each graph's own QDQ placement); measured 1e-2 (tiny resnet8) on random
# inputs, i.e. a few uint8 activation steps.
TOLERANCES = {"fp32": TOLERANCE, "int8": 5e-2}
# Share of inputs whose decision cascade.onnx may make differently from the chain. int8: the stages nested
# in cascade.onnx's If branches are not fused as the standalone stage graphs are, so scores differ by a
# few uint8 steps and an input within that of a threshold can go the other way (measured: 1 of 128 val
# inputs on a Fashion-MNIST PTEENet resnet20 bundle, exit 0 vs 1).
DECISION_SLACK = {"fp32": 0.0, "int8": 0.01}


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute elementwise difference, divided by max(1, largest |b|): absolute for outputs
    within [-1, 1], relative to the largest magnitude above (float32 rounding grows with magnitude)."""
    scale = max(1.0, float(np.abs(b).max()) if b.size else 1.0)
    return float(np.abs(a - b).max()) / scale if a.size else 0.0


def check_chain(runner: CascadeRunner, x: np.ndarray, tolerance: float = TOLERANCE) -> float:
    """Run every stage in sequence and compare the final logits with full.onnx; return the diff."""
    _, chained = runner.stage_outputs(x)
    full = runner.predict_full(x)
    diff = max_abs_diff(chained, full)
    if diff > tolerance:
        raise VerificationError(f"chained stages differ from full.onnx by {diff:.2e} (> {tolerance:.0e})")
    return diff


def check_graph_decisions(graph: GraphRunner, chain: CascadeRunner, inputs: dict[str, np.ndarray]) -> dict[str, dict]:
    """cascade.onnx must make the chain's decisions: equal predictions and exit indices for each named
    batch, run whole and one input at a time (an int8 bundle: all but DECISION_SLACK of them);
    VerificationError naming the first difference."""
    slack = DECISION_SLACK.get(graph.manifest.precision, 0.0)
    report = {}
    for kind, x in inputs.items():
        differing = {}
        for batch in (len(x), 1):
            for start in range(0, len(x), batch):
                part = x[start : start + batch]
                got, want = graph.predict(part), chain.predict(part)
                for field in ("predictions", "exit_index"):
                    for i in np.flatnonzero(getattr(got, field) != getattr(want, field)):
                        differing.setdefault(start + int(i), (batch, field, getattr(got, field)[i], getattr(want, field)[i]))
        if len(differing) > slack * len(x):
            i, (batch, field, got_value, want_value) = min(differing.items())
            raise VerificationError(f"{graph.graph.file} differs from the stage chain on {kind} input {i} at batch {batch}: "
                                    f"{field} {got_value} vs {want_value}"
                                    + (f" ({len(differing)} differences, {slack:.0%} allowed for int8)" if slack else ""))
        report[kind] = {"samples": len(x), "batches": [len(x), 1], "exit_counts": chain.predict(x).exit_counts(),
                        "differing_decisions": len(differing)}
    return report


def cascade_check(manifest: Manifest, chain: CascadeRunner, x: np.ndarray, batch_size: int | None = None) -> Check:
    """The graph `run` uses at `batch_size` (cascade.onnx, or cascade_b1.onnx at 1) makes the chain's decisions
    (batch and one by one), or a skip for bundles without it."""
    graph = manifest.cascade_for(batch_size)
    name = f"{CASCADE_NAME if graph is None else graph.file} vs chain decisions"
    if graph is None:
        why = "a static network: no exit" if not manifest.exits else "exported by an older edgeexit"
        return Check(name, SKIP, f"the bundle has no {CASCADE_NAME} ({why})")
    try:
        check_graph_decisions(GraphRunner(manifest, device=chain.device, batch_size=batch_size), chain, {"random": x})
    except EdgeExitError as exc:
        return Check(name, FAIL, str(exc))
    except Exception as exc:  # onnxruntime's own error types
        return Check(name, FAIL, f"onnxruntime failed: {_first_line(exc)}")
    return Check(name, OK, f"equal predictions and exits on {len(x)} random inputs, batch {len(x)} and 1")


@dataclass(frozen=True)
class Check:
    """The outcome of one check: status is ok, FAIL or skip."""

    name: str
    status: str
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    def line(self) -> str:
        return f"{self.status:<4} {self.name}" + (f": {self.detail}" if self.detail else "")


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc)}" if str(exc).strip() else type(exc).__name__


def _optional_onnx() -> ModuleType | None:
    """The onnx package if installed (the [train] extra); the runtime never needs it."""
    try:
        return importlib.import_module("onnx")
    except ImportError:
        return None


def hash_checks(manifest: Manifest) -> list[Check]:
    """One check per graph file: present, readable, and equal to its manifest sha256."""
    checks = []
    for entry in manifest.files():
        try:
            check_file_hash(manifest.root, entry)
            checks.append(Check(f"sha256 {entry.file}", OK))
        except EdgeExitError as exc:
            checks.append(Check(f"sha256 {entry.file}", FAIL, str(exc)))
    return checks


def onnx_checks(manifest: Manifest) -> list[Check]:
    """onnx.checker (with shape inference) on every graph, or one skip line when onnx is absent."""
    onnx = _optional_onnx()
    if onnx is None:
        return [Check("onnx checker", SKIP, 'the onnx package is not installed (runtime-only install); pip install onnx to run it')]
    checks = []
    for entry in manifest.files():
        try:
            onnx.checker.check_model(str(manifest.path(entry.file)), full_check=True)
            checks.append(Check(f"onnx checker {entry.file}", OK))
        except Exception as exc:  # onnx raises checker, inference and protobuf decode errors
            checks.append(Check(f"onnx checker {entry.file}", FAIL, _first_line(exc)))
    return checks


def runtime_checks(manifest: Manifest, device: str, samples: int, seed: int, tolerance: float) -> list[Check]:
    """Load every graph in onnxruntime against the manifest's names/shapes, then chain vs full.onnx."""
    try:
        runner = CascadeRunner(manifest, device=device)
        runner.full_session()
    except EdgeExitError as exc:
        return [Check("graphs load and match the manifest", FAIL, str(exc)), Check("chain vs full.onnx", SKIP, "graphs did not load")]
    checks = [Check("graphs load and match the manifest", OK, f"{len(runner.sessions)} stages + full.onnx")]
    x = np.random.default_rng(seed).standard_normal((samples, *manifest.input_shape)).astype(np.float32)
    try:
        diff = check_chain(runner, x, tolerance)
        checks.append(Check("chain vs full.onnx", OK, f"max diff {diff:.1e} on {samples} random inputs "
                                                        f"({manifest.precision} tolerance {tolerance:.0e})"))
    except EdgeExitError as exc:
        checks.append(Check("chain vs full.onnx", FAIL, str(exc)))
    except Exception as exc:  # a graph that loads but fails to run raises onnxruntime's own types
        checks.append(Check("chain vs full.onnx", FAIL, f"onnxruntime failed: {_first_line(exc)}"))
    return checks + [cascade_check(manifest, runner, x), *([cascade_check(manifest, runner, x, 1)] if manifest.cascade_b1 else [])]


def verify_bundle(
    root: str | os.PathLike,
    device: str = "cpu",
    samples: int = 8,
    seed: int = 0,
    tolerance: float | None = None,
) -> list[Check]:
    """Every check of a bundle, in order; BundleError if the manifest itself cannot be read or validated."""
    if samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {samples}")
    manifest = load_manifest(root, check_hashes=False)
    checks = [Check("manifest", OK, f"schema of format version {FORMAT_VERSION} holds")]
    checks += hash_checks(manifest)
    checks += onnx_checks(manifest)
    if any(check.failed for check in checks):
        return checks + [Check("graphs and chain", SKIP, "earlier checks failed: tampered or corrupt graphs are not run")]
    tolerance = TOLERANCES[manifest.precision] if tolerance is None else tolerance  # default: by precision
    return checks + runtime_checks(manifest, device, samples, seed, tolerance)
