"""Where a bundle came from: edgeexit's and the exporters' versions (Producer) and the model(s) it was exported
from (ModelInfo, MemberInfo for each model of a model cascade). Stored in the manifest; informational, the
runtime never needs them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from edgeexit.runtime.schema import count, invalid, require, sha256_of


@dataclass(frozen=True)
class MemberInfo:
    """One model of a model cascade: its backbone, training method, model.pt's sha256 and how many stages it spans."""

    backbone: str
    method: str
    sha256: str
    stages: int

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "MemberInfo":
        backbone, method = (require(data, key, str, where) for key in ("backbone", "method"))
        return cls(backbone, method, sha256_of(data, where), count(data, "stages", where, minimum=1))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelInfo:
    """How the bundle's model was built (informational: the runtime never needs it); `members`: the models of a
    model cascade in stage order (empty for a single model)."""

    method: str
    backbone: str
    exit_type: str
    cuts: tuple[str, ...]
    members: tuple[MemberInfo, ...] = ()

    @classmethod
    def from_dict(cls, data: dict) -> "ModelInfo":
        values = [require(data, key, str, "model") for key in ("method", "backbone", "exit_type")]
        cuts = require(data, "cuts", list, "model")
        if not all(isinstance(c, str) for c in cuts):
            raise invalid("model.cuts", "must be a list of strings")
        members = data.get("members", [])
        if not isinstance(members, list):
            raise invalid("model.members", "must be a list")
        return cls(*values, tuple(cuts), tuple(MemberInfo.from_dict(m, f"model.members[{i}]") for i, m in enumerate(members)))

    def to_dict(self) -> dict:
        entry = {"method": self.method, "backbone": self.backbone, "exit_type": self.exit_type, "cuts": list(self.cuts)}
        return {**entry, "members": [m.to_dict() for m in self.members]} if self.members else entry


@dataclass(frozen=True)
class Producer:
    """Who wrote the bundle: edgeexit's version and the ONNX opset, plus (when exported from PyTorch)
    the torch, onnx and onnxruntime versions and the exporting host's machine type."""

    edgeexit: str
    opset: int
    torch: str | None = None
    onnx: str | None = None
    onnxruntime: str | None = None
    host: str | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "Producer":
        optional = {k: require(data, k, str, "producer") for k in ("torch", "onnx", "onnxruntime", "host") if k in data}
        return cls(require(data, "edgeexit", str, "producer"), require(data, "opset", int, "producer"), **optional)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
