"""The one writer of bundle folders: staging, hashing, record edits, cascade.onnx defaults, saving.

A bundle is a folder of ONNX graphs plus manifest.json, whose records (runtime/manifest.py)
name every graph with its sha256. Every command that writes a bundle goes through this module:

- new bundles (export, quantize, static-batch) are built in a hidden folder beside the
  target (`staged_bundle`) and renamed into place only when complete, so a failed or killed
  run leaves any earlier bundle intact;
- a graph file written or rewritten there is recorded with `rehash`; manifest edits are
  functions from records to records (`with_exits`, `with_static_batch`, `with_profile`,
  `with_calibration`), never edits of `to_dict()` output;
- the cascade graphs' per-exit defaults (thresholds, beta, temperature, weights) are rewritten in
  place by `with_graph_defaults` (a byte-level edit without the onnx package: runtime/cascade_bytes.py);
  building cascade.onnx itself needs onnx (export/cascade_graph.py);
  `drop_cascade` removes a cascade.onnx that no longer matches the policies;
- `save_manifest` validates and atomically rewrites manifest.json; in-place edits
  (`save_profile`, `save_calibration`) load, edit and save in one call.

Torch- and onnx-free, so the runtime-side commands (calibrate, profile) write through it too.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

from edgeexit.errors import BundleError, ConfigError
from edgeexit.runtime.files import atomic_write, sha256_file, write_json_atomic
from edgeexit.runtime.cascade_bytes import replace_default
from edgeexit.runtime.manifest import MANIFEST_NAME, Manifest, TensorSpec, load_manifest
from edgeexit.runtime.policies import NO_ENSEMBLE, get_policy, manifest_ensemble
from edgeexit.runtime.profiles import DeviceProfile

__all__ = [
    "check_target", "clean_stale", "drop_cascade", "rehash", "save_calibration", "save_manifest", "save_profile",
    "staged_bundle", "with_exits", "with_graph_defaults", "with_profile", "with_static_batch",
]


# ---------------------------------------------------------------- staging: new bundles appear whole or not at all


def _temp_dir(out: Path, kind: str) -> Path:
    """A fresh hidden folder beside `out`, named with this process id so a later run can tell it is stale."""
    path = Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-", dir=out.parent))
    path.chmod(0o755)
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove the temp folders that killed runs left beside `out` (their process is gone), and put
    back an earlier bundle that a kill between the two renames of replace_dir left moved aside.

    POSIX only (process liveness via kill(pid, 0)); elsewhere stale folders stay until removed by hand.
    """
    if os.name != "posix" or not out.parent.is_dir():
        return []
    removed = []
    for kind in ("old", "tmp"):
        prefix = f".{out.name}.{kind}-"
        for path in sorted(p for p in out.parent.iterdir() if p.name.startswith(prefix) and p.is_dir()):
            pid = path.name[len(prefix) :].split("-")[0]
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
            if kind == "old" and (path / out.name / MANIFEST_NAME).is_file() and not out.exists():
                os.replace(path / out.name, out)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def check_target(out: Path) -> None:
    """BundleError unless `out` is absent, an empty folder or an earlier bundle (nothing else is ever overwritten)."""
    if out.exists() and not out.is_dir():
        raise BundleError(f"refusing to overwrite {out}: it is a file, not a bundle folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise BundleError(f"refusing to overwrite {out}: it exists and is not an edgeexit bundle")


def replace_dir(staged: Path, out: Path) -> None:
    """Move a finished bundle into place; an earlier bundle at `out` survives any failure."""
    if out.exists():
        check_target(out)  # again: the target may have changed while the bundle was built
        old = _temp_dir(out, "old")
        os.replace(out, old / out.name)
        try:
            os.replace(staged, out)
        except OSError:
            os.replace(old / out.name, out)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, out)


@contextlib.contextmanager
def staged_bundle(out: str | os.PathLike, progress: Callable[[str], None] = lambda message: None) -> Iterator[Path]:
    """Yield an empty temp folder beside `out`; on a clean exit it replaces `out`, on any failure it is removed."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    check_target(out)  # before any work: a wrong target fails in a second, not after the export
    for path in clean_stale(out):
        progress(f"removed {path.name}, left by a run that was killed")
    staged = _temp_dir(out, "tmp")
    try:
        yield staged
        replace_dir(staged, out)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


# ---------------------------------------------------------------- record edits: records in, records out


def rehash(manifest: Manifest, file: str) -> Manifest:
    """The manifest with graph `file`'s sha256 recomputed from the file in manifest.root (after a transform wrote it)."""
    digest = sha256_file(manifest.path(file))
    if manifest.full.file == file:
        return dataclasses.replace(manifest, full=dataclasses.replace(manifest.full, sha256=digest))
    for field in ("cascade", "cascade_b1"):
        graph = getattr(manifest, field)
        if graph is not None and graph.file == file:
            return dataclasses.replace(manifest, **{field: dataclasses.replace(graph, sha256=digest)})
    stages = tuple(dataclasses.replace(s, sha256=digest) if s.file == file else s for s in manifest.stages)
    if stages == manifest.stages and all(s.file != file for s in manifest.stages):
        raise BundleError(f"{file} is not a graph of the bundle at {manifest.root}")
    return dataclasses.replace(manifest, stages=stages)


def with_exits(manifest: Manifest, kinds: Sequence[str] | None = None, thresholds: Sequence[float] | None = None,
               temperatures: Sequence[float] | None = None, args: Sequence[dict] | None = None,
               ensemble: str | None = None, weights: Sequence[float] | None = None) -> Manifest:
    """A copy with exit k's policy kind, threshold, temperature and extra arguments set (each list: one value per
    exit; None keeps them), and the ensemble at deferral with its per-exit weights (all 1 when None). An exit whose
    kind changes starts from no arguments."""
    exits = manifest.exits
    for name, values in (("policy kinds", kinds), ("thresholds", thresholds), ("temperatures", temperatures),
                         ("policy arguments", args), ("ensemble weights", weights)):
        if values is not None and len(values) != len(exits):
            raise BundleError(f"got {len(values)} {name} for {len(exits)} exits")
    stages = []
    for k, stage in enumerate(manifest.stages[:-1]):
        spec, policy = stage.exit, stage.exit.policy
        if kinds is not None and kinds[k] != policy.kind:
            policy = dataclasses.replace(policy, kind=kinds[k], args={})
        if thresholds is not None:
            policy = policy.with_threshold(thresholds[k])
        if args is not None:
            policy = policy.with_args(args[k])
        if ensemble is not None:
            policy = dataclasses.replace(policy, ensemble=ensemble, weight=1.0 if weights is None else float(weights[k]))
        temperature = spec.temperature if temperatures is None else float(temperatures[k])
        stages.append(dataclasses.replace(stage, exit=dataclasses.replace(spec, policy=policy, temperature=temperature)))
    return dataclasses.replace(manifest, stages=(*stages, manifest.stages[-1]))


def with_static_batch(manifest: Manifest, batch: int) -> Manifest:
    """A copy whose tensors' first dim is the fixed `batch` (the graphs must have been rewritten to match)."""
    def fixed(tensor: TensorSpec) -> TensorSpec:
        return dataclasses.replace(tensor, shape=(batch, *tensor.shape[1:]))

    stages = tuple(dataclasses.replace(s, inputs=tuple(map(fixed, s.inputs)), outputs=tuple(map(fixed, s.outputs)))
                   for s in manifest.stages)
    spec = dataclasses.replace(manifest.input_spec, shape=(batch, *manifest.input_spec.shape[1:]))
    return dataclasses.replace(manifest, input_spec=spec, stages=stages, static_batch=batch)


def with_profile(manifest: Manifest, profile: DeviceProfile) -> Manifest:
    """A copy with `profile` added under its key (replacing one measured under the same key)."""
    return dataclasses.replace(manifest, profiles={**manifest.profiles, profile.key: profile})


# ---------------------------------------------------------------- writing


def save_manifest(root: str | os.PathLike, manifest: Manifest | dict) -> Manifest:
    """Validate (a dict) and atomically (re)write a bundle's manifest.json; returns the records written."""
    if not isinstance(manifest, Manifest):
        manifest = Manifest.from_dict(manifest, Path(root))
    write_json_atomic(Path(root) / MANIFEST_NAME, manifest.to_dict())
    return dataclasses.replace(manifest, root=Path(root))


def drop_cascade(manifest: Manifest) -> Manifest:
    """Remove cascade.onnx and cascade_b1.onnx (they compile in policies the bundle no longer has) and save; the
    stage chain runs."""
    saved = save_manifest(manifest.root, dataclasses.replace(manifest, cascade=None, cascade_b1=None))
    for graph in manifest.cascades:
        manifest.path(graph.file).unlink(missing_ok=True)
    return saved


def save_profile(bundle: str | os.PathLike, profile: DeviceProfile) -> Manifest:
    """Add (or replace) `profile` in the bundle's manifest; other profiles stay; atomic rewrite."""
    return save_manifest(bundle, with_profile(load_manifest(bundle, check_hashes=False), profile))


def with_graph_defaults(manifest: Manifest, name: str, values: Sequence[float]) -> Manifest:
    """Rewrite the default of per-exit vector `name` (thresholds, beta, temperature, weights) in every cascade graph
    file (cascade.onnx, cascade_b1.onnx), each replaced atomically; returns the manifest with the new defaults and
    sha256s (the caller saves it). Unchanged for bundles without those graphs or without that vector."""
    for field in ("cascade", "cascade_b1"):
        entry = getattr(manifest, field)
        default = None if entry is None else entry.default(name)
        if default is None:
            continue
        if len(values) != len(default):
            raise ConfigError(f"{entry.file} input '{name}' takes {len(default)} values, got {len(values)}")
        path = manifest.path(entry.file)
        content = replace_default(path.read_bytes(), name, default, values, str(path))
        atomic_write(path, lambda tmp: tmp.write_bytes(content))
        inputs = tuple(dataclasses.replace(t, default=tuple(float(v) for v in values)) if t.name == name else t for t in entry.inputs)
        manifest = dataclasses.replace(manifest, **{field: dataclasses.replace(entry, inputs=inputs, sha256=sha256_file(path))})
    return manifest


def save_calibration(bundle: str | os.PathLike, record: dict) -> Manifest:
    """Write a calibration record's policy, thresholds, temperatures (and betas) into each exit, plus the record.

    cascade.onnx is kept, its defaults rewritten, when the policies stay (and a softmax policy's
    temperatures have a graph input to go to); otherwise it is removed and the stage chain runs
    until it is rebuilt (export/cascade_graph.py `rebuild_cascade`, which needs onnx).
    """
    manifest = load_manifest(bundle, check_hashes=False)
    kinds_before = [p.kind for p in manifest.policies]
    chosen, kinds = record["chosen"], list(record["policies"])
    thresholds, temperatures = [float(t) for t in chosen["thresholds"]], [float(t) for t in record["temperatures"]]
    betas = [float(b) for b in chosen["betas"]] if "betas" in chosen else None
    ensemble, ensemble_before = record.get("ensemble", {"mode": NO_ENSEMBLE}), manifest_ensemble(manifest.policies)[0]
    manifest = with_exits(manifest, kinds, thresholds, temperatures, None if betas is None else [{"beta": b} for b in betas],
                          ensemble["mode"], ensemble.get("weights"))
    manifest = dataclasses.replace(manifest, calibration=record)
    graph = manifest.cascade
    softmax_scored = any(get_policy(kind).reads_probabilities for kind in kinds)
    takes_temperature = graph is not None and graph.default("temperature") is not None
    if kinds != kinds_before or ensemble["mode"] != ensemble_before or not (
            takes_temperature or not (softmax_scored and any(t != 1.0 for t in temperatures))):
        return drop_cascade(manifest)
    if "weights" in ensemble:
        manifest = with_graph_defaults(manifest, "weights", [float(w) for w in ensemble["weights"]])
    if betas is not None:
        manifest = with_graph_defaults(manifest, "beta", betas)
    manifest = with_graph_defaults(manifest, "thresholds", thresholds)
    return save_manifest(bundle, with_graph_defaults(manifest, "temperature", temperatures))
