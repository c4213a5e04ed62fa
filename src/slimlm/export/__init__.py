"""Exports for edge runtimes: ONNX graphs (Optimum's layout or onnxruntime-genai's), their int8/int4 quantization,
parity with the PyTorch input, and the check in the clients users load them in."""
