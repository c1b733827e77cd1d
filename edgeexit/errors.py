"""The project's error types: each maps to one CLI exit code and a one-line message.

Torch-free: the runtime, the training side and the CLI all raise these; `edgeexit.runtime`
re-exports them.
"""
from __future__ import annotations


class EdgeExitError(Exception):
    """Base of every error edgeexit raises on purpose; the CLI prints it as one line."""

    exit_code = 1


class ConfigError(EdgeExitError):
    """A bad option or model configuration (unknown name, out-of-range value)."""

    exit_code = 2


class BundleError(EdgeExitError):
    """A bundle that is missing, malformed, of an unknown version or tampered with."""

    exit_code = 3


class InputError(EdgeExitError):
    """Input data with the wrong shape, dtype, values, or an unreadable file."""

    exit_code = 4


class DeviceError(EdgeExitError):
    """An unknown device or an execution provider that is not available here."""

    exit_code = 5


class MissingExtraError(EdgeExitError):
    """A command needs an optional dependency (the [train] extra) that is not installed."""

    exit_code = 6


class VerificationError(EdgeExitError):
    """Exported graphs do not reproduce the PyTorch model or each other."""

    exit_code = 7


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (or its type name), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
