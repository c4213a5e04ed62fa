"""The `kind: cast` recipe section: the floating-point dtype to save the input model in."""

from __future__ import annotations

from typing import Literal

from slimlm.stage import StageConfig


class CastConfig(StageConfig):
    kind: Literal["cast"]
    dtype: Literal["float32", "bfloat16", "float16"]
