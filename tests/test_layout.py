"""The shape of the codebase a newcomer relies on: layers that import downwards only, and a plan without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
# What a stage package may not import: the entry points and the run's machinery sit above every stage.
ABOVE_STAGES = ("slimlm.cli", "slimlm.runner", "slimlm.launch", "slimlm.recipe", "slimlm.report", "slimlm.stages")
STAGE_PACKAGES = ("compress", "distill", "quantize", "export", "cast")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """slimlm modules a file imports, at any depth except under `if TYPE_CHECKING:`."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("slimlm"))
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("slimlm"):
                found.add(child.module)
                found.update(f"{child.module}.{a.name}" for a in child.names)  # `from slimlm import arch`
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in (SRC / "slimlm").rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    state: dict[str, str] = {}

    def walk(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != "open", "import cycle: " + " -> ".join([*trail[trail.index(nxt) :], nxt])
            if nxt not in state:
                walk(nxt, [*trail, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])


def test_stage_packages_import_nothing_above_the_stage_contract():
    graph = import_graph()
    offending = {
        module: sorted(m for m in imported if m.startswith(ABOVE_STAGES))
        for module, imported in graph.items()
        if module.split(".")[1:2] and module.split(".")[1] in STAGE_PACKAGES
    }
    assert not {k: v for k, v in offending.items() if v}
    assert "slimlm.launch" in graph and "slimlm.distill.launch" not in graph  # the launcher is an entry point


def test_plan_validates_every_shipped_recipe_without_torch():
    """`slimlm plan` imports no torch, transformers or accelerate: validating a recipe should take a moment."""
    code = (
        "import sys, pathlib\n"
        "from typer.testing import CliRunner\n"
        "from slimlm.cli import app\n"
        "for recipe in sorted(pathlib.Path('recipes').glob('*.yaml')):\n"
        "    result = CliRunner().invoke(app, ['plan', str(recipe)])\n"
        "    assert result.exit_code == 0, (recipe, result.output)\n"
        "heavy = ('torch', 'transformers', 'accelerate', 'peft', 'onnx', 'onnxruntime', 'lm_eval', 'numpy')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
