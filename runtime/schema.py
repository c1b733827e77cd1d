"""The checks every bundle record's `from_dict` is made of: each names the first problem as
"invalid manifest: WHERE: WHY" (a BundleError), so a bad manifest.json fails in one line."""
from __future__ import annotations

import math
from typing import Any

from edgeexit.errors import BundleError

BATCH_DIM = "batch"
Shape = tuple  # ("batch", C, H, W): the symbolic batch dim (or a static-batch bundle's int), then positive ints


def invalid(where: str, why: str) -> BundleError:
    """The error for a manifest entry that breaks the schema."""
    return BundleError(f"invalid manifest: {where}: {why}")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__


def require(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """obj[key], refused when obj is not an object, lacks the key, or the value is not of `kind` (bool is no number)."""
    if not isinstance(obj, dict) or key not in obj:
        raise invalid(where, f"missing key '{key}'")
    value = obj[key]
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise invalid(f"{where}.{key}", f"expected {_kind_name(kind)}, got bool")
    if not isinstance(value, kind):
        raise invalid(f"{where}.{key}", f"expected {_kind_name(kind)}, got {type(value).__name__}")
    return value


def is_number(value: Any) -> bool:
    """A finite int or float (not bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_batch_size(value: Any) -> bool:
    """A positive int (not bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def count(obj: dict, key: str, where: str, minimum: int = 0) -> int:
    """obj[key] as an int >= minimum."""
    value = require(obj, key, int, where)
    if value < minimum:
        raise invalid(f"{where}.{key}", f"must be >= {minimum}" if minimum != 1 else "must be a positive int")
    return value


def sha256_of(entry: dict, where: str) -> str:
    """entry["sha256"]: 64 lowercase hex digits."""
    value = require(entry, "sha256", str, where)
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise invalid(f"{where}.sha256", "must be 64 lowercase hex digits")
    return value


def shape_of(shape: Any, where: str) -> Shape:
    """A tensor shape: the batch dim ('batch' or a static int), then positive ints."""
    if not isinstance(shape, list) or not shape:
        raise invalid(where, "shape must be a non-empty list")
    if shape[0] != BATCH_DIM and not is_batch_size(shape[0]):
        raise invalid(where, f"first dim must be the symbolic '{BATCH_DIM}' (or a static-batch bundle's batch size)")
    for dim in shape[1:]:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise invalid(where, f"dims after the batch must be positive ints, got {dim!r}")
    return tuple(shape)


def check_batch_dim(where: str, shape: Shape, static_batch: int | None) -> None:
    """Every tensor's first dim is the symbolic 'batch', or the static batch of a static-batch bundle."""
    batch = BATCH_DIM if static_batch is None else static_batch
    if shape[0] != batch:
        expected = f"the symbolic '{BATCH_DIM}'" if static_batch is None else f"the static batch {static_batch}"
        raise invalid(where, f"first dim must be {expected}, got {shape[0]!r}")
