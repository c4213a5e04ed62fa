"""Checks every export makes of its input before writing anything: full precision, and keep_8bit naming real layers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slimlm.errors import SourceError
from slimlm.export.config import ExportConfig
from slimlm.quantize.layers import matches
from slimlm.stage import field_error


def refuse_quantized_input(config: ExportConfig, input_dir: Path) -> None:
    cfg = json.loads((input_dir / "config.json").read_text())
    if "quantization_config" in cfg:
        method = cfg["quantization_config"].get("quant_method", "?")
        raise SourceError(
            f"stage '{config.name}': the input model is {method}-quantized; export from the full-precision "
            "stage instead (put the export stage before any bitsandbytes stage)"
        )


def check_keep_8bit(config: ExportConfig, model: torch.nn.Module) -> None:
    """Every keep_8bit pattern must name at least one Linear layer: a typo would silently keep nothing."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for pattern in config.keep_8bit:
        if not any(matches(n, [pattern]) for n in names):
            kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise field_error(
                config,
                "keep_8bit",
                f"{pattern!r} names no Linear layer of this model; "
                f"its layers are {', '.join(kinds)} (or globs of whole names such as {names[0]})",
            )
