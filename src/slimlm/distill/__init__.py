"""Distillation: teacher -> student losses, the training loop on accelerate, and the distill stage."""
