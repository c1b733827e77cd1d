"""Exporter: model.pt -> bundle (per-stage ONNX graphs fused with their exit heads + manifest)."""
from edgeexit.export.exporter import export_bundle

__all__ = ["export_bundle"]
