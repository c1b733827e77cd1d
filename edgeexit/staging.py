"""Atomic bundle folders: build in a hidden temp folder beside the target, then rename into place.

Torch- and onnx-free; the one implementation behind export and the bundle transforms (quantize, static-batch).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from edgeexit.errors import BundleError
from edgeexit.runtime.manifest import MANIFEST_NAME


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
