"""edgeexit: early-exit CNNs for edge devices.

Importing this package is cheap and torch-free; the training side lives in submodules
(`edgeexit.models`, `edgeexit.trainer`, ...) that need the `[train]` extra.
"""
__version__ = "0.1.0"
