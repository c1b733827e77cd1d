"""Torch-free runtime: load a bundle, run the early-exit cascade on onnxruntime, measure latency.

Imports only numpy and onnxruntime (and Pillow for image files), so it installs on a
Raspberry Pi or a Jetson without PyTorch.
"""
from edgeexit.errors import (
    BundleError,
    ConfigError,
    DeviceError,
    EdgeExitError,
    InputError,
    MissingExtraError,
    VerificationError,
)
from edgeexit.runtime.manifest import Manifest, load_manifest
from edgeexit.runtime.cascade import CascadeResult, CascadeRunner, Runner
from edgeexit.runtime.graph import GraphRunner, open_runner
from edgeexit.runtime.drift import DriftGuard, GuardSettings
from edgeexit.runtime.policies import POLICIES, get_policy

__all__ = [
    "BundleError",
    "CascadeResult",
    "CascadeRunner",
    "ConfigError",
    "DeviceError",
    "DriftGuard",
    "EdgeExitError",
    "GraphRunner",
    "GuardSettings",
    "InputError",
    "Manifest",
    "MissingExtraError",
    "POLICIES",
    "Runner",
    "VerificationError",
    "get_policy",
    "load_manifest",
    "open_runner",
]
