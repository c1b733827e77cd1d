"""edgeexit: early-exit CNNs for edge devices.

Importing this package is cheap and torch-free. Layers, bottom up: `edgeexit.errors` and
`edgeexit.registry` (shared by every side), `edgeexit.runtime` (numpy + onnxruntime),
`edgeexit.train` (the `[train]` extra: models, losses, trainer), `edgeexit.export`
(model.pt -> bundle), `edgeexit.workflows` and `edgeexit.cli` on top.
"""
__version__ = "0.1.0"
