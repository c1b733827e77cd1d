"""Exporter: model.pt -> bundle (per-stage ONNX graphs fused with their exit heads + manifest)."""
from typing import Any

__all__ = ["export_bundle"]


def __getattr__(name: str) -> Any:
    """export_bundle needs torch, so it loads on first use: quantize and static-batch import cascade_graph with onnx alone."""
    if name == "export_bundle":
        from edgeexit.export.exporter import export_bundle

        return export_bundle
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
