"""Map a --device name to onnxruntime execution providers, with a clear error if unavailable."""
from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from edgeexit.errors import DeviceError
from edgeexit.registry import Registry

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

# device name -> providers in priority order; the first one is the one the device needs.
DEVICES: Registry[tuple[str, ...]] = Registry("device", DeviceError)
for _name, _providers in (
    ("cpu", (CPU,)),
    ("cuda", (CUDA, CPU)),
    ("tensorrt", (TENSORRT, CUDA, CPU)),
    ("jetson", (TENSORRT, CUDA, CPU)),
    ("coreml", ("CoreMLExecutionProvider", CPU)),
    ("nnapi", ("NnapiExecutionProvider", CPU)),
    ("openvino", ("OpenVINOExecutionProvider", CPU)),
    ("directml", ("DmlExecutionProvider", CPU)),
    ("rocm", ("ROCMExecutionProvider", CPU)),
    ("xnnpack", ("XnnpackExecutionProvider", CPU)),
):
    DEVICES.register(_name, _providers)


def resolve_providers(device: str, cache_dir: Path | None = None) -> list:
    """Providers (with options) for `device`; DeviceError if unknown or not available here."""
    wanted = DEVICES.get(device)
    available = ort.get_available_providers()
    if wanted[0] not in available:
        raise DeviceError(
            f"device '{device}' needs {wanted[0]}, which this onnxruntime does not have; "
            f"available providers: {', '.join(available)}"
        )
    providers: list = []
    for name in wanted:
        if name not in available:
            continue
        if name == TENSORRT and cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir)}
            providers.append((name, options))
        else:
            providers.append(name)
    return providers
