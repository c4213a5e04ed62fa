"""Quantization on the torch side: calibration, SmoothQuant, GPTQ, and bitsandbytes for GPU serving."""
