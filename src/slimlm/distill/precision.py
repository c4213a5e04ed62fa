"""Which precision distillation trains in: `mixed_precision: auto` picks bf16 where the hardware computes it.

bf16 autocast keeps fp32 master weights and optimizer state; the matmuls run in bf16. On a CPU that
pays only where the instruction set has bf16 (AVX512-BF16 or AMX): elsewhere torch emulates it and it
is slower than fp32, so `auto` stays in fp32 there.
"""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

import torch

# The Linux /proc/cpuinfo flags for instructions that compute bf16 dot products in hardware.
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@cache
def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (read from /proc/cpuinfo; False where it cannot tell)."""
    if platform.system() != "Linux":
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool(CPU_BF16_FLAGS & set(line.split(":", 1)[1].split()))
    return False


def device_computes_bf16(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_computes_bf16()


def resolve_mixed_precision(requested: str, device: str) -> str:
    """The accelerate mixed-precision mode: `auto` becomes bf16 where `device` computes it, else no."""
    if requested != "auto":
        return requested
    return "bf16" if device_computes_bf16(device) else "no"


def resolve_teacher_dtype(requested: str | None, mixed_precision: str, recipe_dtype: str) -> str:
    """The teacher's forward runs in bf16/fp16 with the student's autocast unless the recipe names a dtype."""
    if requested is not None:
        return requested
    return {"bf16": "bfloat16", "fp16": "float16"}.get(mixed_precision, recipe_dtype)
