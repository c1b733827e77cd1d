"""Measured latency records: Timing, DeviceProfile (one host/device/threads/batch/engine), their keys,
and the engine names a profile is keyed by. Stored under the manifest's "profiles"; `edgeexit profile`
measures them (runtime/profile.py) and latency.py predicts from them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from edgeexit.runtime.schema import invalid, is_number, require


@dataclass(frozen=True)
class Timing:
    """Milliseconds of one measured path over warm repeats: mean and percentiles."""

    mean: float
    min: float
    p50: float
    p95: float
    p99: float

    QUANTILES = (("min", 0.0), ("p50", 0.50), ("p95", 0.95), ("p99", 0.99))

    @classmethod
    def from_seconds(cls, seconds: Sequence[float]) -> "Timing":
        """Timing of per-call wall times given in seconds."""
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        return cls(float(ms.mean()), float(ms.min()), *(float(np.percentile(ms, q)) for q in (50, 95, 99)))

    def stat(self, name: str) -> float:
        """The value named 'mean', 'p50' or 'p95'."""
        return getattr(self, name)

    def to_dict(self) -> dict:
        return {"mean": self.mean, "min": self.min, "p50": self.p50, "p95": self.p95, "p99": self.p99}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "Timing":
        values = [require(data, key, (int, float), where) for key in ("mean", "min", "p50", "p95", "p99")]
        if not all(is_number(v) and v >= 0 for v in values):
            raise invalid(where, "timings must be finite numbers >= 0 ms")
        if not values[1] <= values[2] <= values[3] <= values[4]:
            raise invalid(where, "timings must satisfy min <= p50 <= p95 <= p99")
        return cls(*(float(v) for v in values))


ENGINES = ("auto", "graph", "chain")  # how a bundle runs: cascade.onnx, one session per stage, or graph when present


def profile_key(host: str, device: str, threads: int, batch_size: int, engine: str) -> str:
    """The name a device profile is stored and selected under: HOST/DEVICE/tTHREADS/bBATCH/ENGINE."""
    return f"{host}/{device}/t{threads}/b{batch_size}/{engine}"


@dataclass(frozen=True)
class DeviceProfile:
    """Measured latency of a bundle on one host/device/threads/batch (threads 0 = onnxruntime's default).

    `stages[k]`: stage k's session run plus its exit decision, alone. `exits[k]`: one whole
    cascade call in which every input leaves at exit k (the last entry: the final stage), so
    it includes every earlier stage and decision and the runner's bookkeeping. `exits_at_one`:
    `exits` at batch 1 (the same as `exits` when batch_size is 1), for the cost of a stage
    that runs on only a few surviving inputs. `full`: full.onnx. All in ms
    per call at `batch_size` inputs.
    """

    host: str
    device: str
    threads: int
    batch_size: int
    engine: str
    stages: tuple[Timing, ...]
    exits: tuple[Timing, ...]
    exits_at_one: tuple[Timing, ...]
    full: Timing
    repeats: int
    providers: tuple[str, ...]
    onnxruntime: str

    @property
    def key(self) -> str:
        return profile_key(self.host, self.device, self.threads, self.batch_size, self.engine)

    def to_dict(self) -> dict:
        return {
            "host": self.host, "device": self.device, "threads": self.threads, "batch_size": self.batch_size,
            "engine": self.engine, "stages": [t.to_dict() for t in self.stages], "exits": [t.to_dict() for t in self.exits],
            "exits_at_one": [t.to_dict() for t in self.exits_at_one], "full": self.full.to_dict(), "repeats": self.repeats,
            "providers": list(self.providers), "onnxruntime": self.onnxruntime,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str, num_stages: int) -> "DeviceProfile":
        strings = [require(data, key, str, where) for key in ("host", "device")]
        threads, batch_size, repeats = (require(data, key, int, where) for key in ("threads", "batch_size", "repeats"))
        if threads < 0 or batch_size < 1 or repeats < 1:
            raise invalid(where, "threads must be >= 0, batch_size and repeats >= 1")
        timings = {}
        for key in ("stages", "exits", "exits_at_one"):
            entries = require(data, key, list, where)
            if len(entries) != num_stages:
                raise invalid(f"{where}.{key}", f"must have one entry per stage ({num_stages})")
            timings[key] = tuple(Timing.from_dict(t, f"{where}.{key}[{i}]") for i, t in enumerate(entries))
        providers = require(data, "providers", list, where)
        return cls(*strings, threads, batch_size, require(data, "engine", str, where), timings["stages"],
                   timings["exits"], timings["exits_at_one"], Timing.from_dict(require(data, "full", dict, where), f"{where}.full"),
                   repeats, tuple(str(p) for p in providers), require(data, "onnxruntime", str, where))


def read_profiles(data: Any, num_stages: int) -> dict[str, DeviceProfile]:
    """The manifest's "profiles" object (absent = none) as DeviceProfiles by key, validated."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise invalid("profiles", "must be an object keyed by profile name")
    profiles = {name: DeviceProfile.from_dict(entry, f"profiles[{name!r}]", num_stages) for name, entry in data.items()}
    for name, profile in profiles.items():
        if name != profile.key:
            raise invalid(f"profiles[{name!r}]", f"key must be '{profile.key}' (host/device/threads/batch/engine)")
    return profiles
