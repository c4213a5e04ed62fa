"""YAML from untrusted hands (a recipe, a `--set` value, a run directory's recipe.yaml), read within bounds.

`yaml.safe_load` never runs code, but it still lets 444 bytes of aliases (`a1: &a1 [*a0, *a0, ...]`)
stand for billions of values, a key appear twice with the last one silently winning, and an alias
point back at its own anchor. Here every document is composed once, checked, and only then built:
its size after alias expansion is bounded, duplicate keys and self-referencing aliases are errors
that name the line, and the text must be UTF-8.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1 << 20  # a recipe is a page of settings; a megabyte is far past any real one
MAX_VALUES = 100_000  # scalars, lists and mappings after alias expansion; the shipped recipes have < 1,000


class YamlInputError(ValueError):
    """The text is not YAML slimlm will read; `line` is 1-based where known."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


def read_text(path: Path, what: str = "recipe") -> str:
    """The UTF-8 text of a file, refused when it is too large, binary or not UTF-8."""
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise YamlInputError(f"{what} {path} is {size:,} bytes; a {what} may be at most {MAX_BYTES:,}")
    data = path.read_bytes()
    if b"\0" in data:
        raise YamlInputError(f"{what} {path} is a binary file, not YAML text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise YamlInputError(
            f"{what} {path} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); save it as UTF-8"
        ) from None


def compose(text: str) -> yaml.Node | None:
    """Parse YAML into its node graph and check it; raises YamlInputError, or yaml.YAMLError for bad syntax."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise YamlInputError(f"the YAML text is longer than {MAX_BYTES:,} bytes")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise YamlInputError("the YAML is nested too deeply") from None
    if node is not None:
        _check(node)
    return node


def construct(node: yaml.Node | None) -> Any:
    """Python values from a node graph that `compose` accepted."""
    if node is None:
        return None
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load(text: str) -> Any:
    return construct(compose(text))


def _check(root: yaml.Node) -> None:
    """Count the values a document expands to (each shared node as often as it is reached), and refuse
    duplicate keys and aliases that contain themselves."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise YamlInputError("an alias refers to the value that contains it", node.start_mark.line + 1)
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    line = k.start_mark.line + 1
                    if k.value in seen:
                        raise YamlInputError(
                            f"key {k.value!r} appears twice in one mapping (lines {seen[k.value]} and {line}); "
                            "keep one",
                            line,
                        )
                    seen[k.value] = line
                total += size(k) + size(v)
                if total > MAX_VALUES:
                    break
        elif isinstance(node, yaml.SequenceNode):
            for v in node.value:
                total += size(v)
                if total > MAX_VALUES:
                    break
        if total > MAX_VALUES:
            raise YamlInputError(
                f"the YAML expands to more than {MAX_VALUES:,} values (through aliases such as *name); "
                "write the values out instead",
                node.start_mark.line + 1,
            )
        open_nodes.discard(key)
        sizes[key] = total
        return total

    try:
        size(root)
    except RecursionError:
        raise YamlInputError("the YAML is nested too deeply") from None
