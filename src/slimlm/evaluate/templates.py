"""Task templates (`text:`, `choices:`, `target:`) are untrusted: checked at plan time, sandboxed at run time.

lm-eval renders templates with a plain Jinja environment, in which
`{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system('id') }}` runs a shell
command. slimlm therefore accepts only templates made of the record's fields, item and attribute
lookups, literals, comparisons, `if`/`for`, and filters that cannot allocate without bound
(`"x"|center(10**9)` can, and `text|replace("", text)` squares its input, so neither is one of them); and while lm-eval evaluates, its environment
is swapped for Jinja's immutable sandbox, so a template that somehow got past the check still
cannot reach Python internals.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jinja2
from jinja2 import nodes

# Filters whose output is bounded by their input's size (no width, count or pattern arguments to abuse).
SAFE_FILTERS = frozenset(
    {
        "capitalize", "default", "d", "first", "float", "int", "join", "last", "length", "count", "list",
        "lower", "upper", "title", "trim", "string", "reverse", "sort", "unique", "sum", "min", "max",
        "abs", "round", "wordcount", "tojson", "e", "escape", "striptags",
    }
)  # fmt: skip
ALLOWED_NODES = (
    nodes.Template, nodes.Output, nodes.TemplateData, nodes.Name, nodes.Const, nodes.Getitem, nodes.Getattr,
    nodes.Slice, nodes.Filter, nodes.Test, nodes.Concat, nodes.Add, nodes.Compare, nodes.Operand, nodes.And,
    nodes.Or, nodes.Not, nodes.CondExpr, nodes.If, nodes.For, nodes.List, nodes.Tuple, nodes.Neg, nodes.Pos,
)  # fmt: skip
REFUSED_NODES = {"Call": "a call", "Assign": "{% set %}", "Mul": "'*'", "Pow": "'**'", "Macro": "a macro"}
SAFE_TESTS = frozenset({"defined", "undefined", "none", "string", "number", "sequence", "mapping", "in"})


def template_fields(template: str) -> set[str]:
    """The top-level variables a Jinja template reads (`{{goal}}`, `{{choices[0]}}` -> goal, choices)."""
    from jinja2 import meta

    return meta.find_undeclared_variables(jinja2.Environment().parse(template))


def template_problem(template: str) -> str | None:
    """Why a template is refused, or None: anything but fields, lookups, literals, if/for and SAFE_FILTERS."""
    try:
        tree = jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as e:
        return f"does not parse: {e}"
    for node in tree.find_all(nodes.Node):
        if not isinstance(node, ALLOWED_NODES):
            what = REFUSED_NODES.get(type(node).__name__, type(node).__name__.lower())
            return f"uses {what} ({_snippet(node)}), which task templates may not"
        if isinstance(node, nodes.Name) and node.name in (
            "self",
            "range",
            "lipsum",
            "cycler",
            "joiner",
            "namespace",
            "dict",
        ):
            return f"uses Jinja's {node.name!r}; a template may read only the record's fields"
        if isinstance(node, nodes.Getattr) and node.attr.startswith("_"):
            return f"reads the attribute {node.attr!r}; a template may read only the record's fields"
        if (
            isinstance(node, nodes.Getitem)
            and isinstance(node.arg, nodes.Const)
            and str(node.arg.value).startswith("_")
        ):
            return f"reads the item {node.arg.value!r}; a template may read only the record's fields"
        if isinstance(node, nodes.Filter) and node.name not in SAFE_FILTERS:
            return f"uses the filter {node.name!r}; allowed filters: {', '.join(sorted(SAFE_FILTERS))}"
        if isinstance(node, nodes.Test) and node.name not in SAFE_TESTS:
            return f"uses the test {node.name!r}; allowed tests: {', '.join(sorted(SAFE_TESTS))}"
        if isinstance(node, nodes.For) and any(True for _ in node.find_all(nodes.For)):
            return "nests one `for` inside another, which can multiply without bound; use one loop"
    return None


def _snippet(node: nodes.Node) -> str:
    name = getattr(node, "name", None) or getattr(node, "attr", None)
    return f"{name!r} on line {node.lineno}" if name else f"line {node.lineno}"


@contextlib.contextmanager
def sandboxed_lm_eval() -> Iterator[None]:
    """While lm-eval runs, its templates render in Jinja's immutable sandbox instead of its plain environment."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from lm_eval import utils

    original = utils.env
    sandbox = ImmutableSandboxedEnvironment(
        loader=jinja2.BaseLoader(), undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )
    sandbox.filters.update({name: original.filters[name] for name in ("regex_replace",) if name in original.filters})
    utils.env = sandbox
    try:
        yield
    finally:
        utils.env = original
