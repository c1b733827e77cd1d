"""The one guard for optional dependencies: a failed import becomes a one-line MissingExtraError saying what to install.

Torch-free, so the runtime, the export side and the CLI all import their optional packages
through it (`require` for one module, `guard` around a block of lazy imports).
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager
from types import ModuleType
from typing import Iterator

from edgeexit.errors import MissingExtraError, first_line

TRAIN_EXTRA = 'pip install "edgeexit[train]"'


def _missing(exc: ImportError, purpose: str, install: str) -> MissingExtraError:
    missing = getattr(exc, "name", None) or first_line(exc)
    return MissingExtraError(f"{purpose} needs {missing}, which is not installed: {install}")


def require(module: str, purpose: str, install: str = TRAIN_EXTRA) -> ModuleType:
    """`module` imported, or MissingExtraError: "<purpose> needs <package>, which is not installed: <install>"."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise _missing(exc, purpose, install) from None


@contextmanager
def guard(purpose: str, install: str = TRAIN_EXTRA) -> Iterator[None]:
    """Around lazy imports: an ImportError inside becomes the same one-line MissingExtraError."""
    try:
        yield
    except ImportError as exc:
        raise _missing(exc, purpose, install) from None
