"""Quantization and export of model artifacts: dtype casts, bitsandbytes, ONNX."""
