"""Which Linear layers a recipe's layer patterns (keep_8bit, GPTQ's skip list) name."""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase


def matches(name: str, patterns: Sequence[str]) -> bool:
    """`down_proj` names every layer's down_proj; `model.layers.0.*` globs whole module names."""
    return any(fnmatchcase(name, p) or fnmatchcase(name.rsplit(".", 1)[-1], p) for p in patterns)
