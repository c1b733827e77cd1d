"""Export settings the torch-free CLI shows as defaults (the exporter itself needs torch and onnx)."""

DEFAULT_OPSET = 18  # ONNX opset of every exported graph
