"""The `slimlm` command: run, plan and status (see `slimlm --help`)."""

from __future__ import annotations

import contextlib
import errno
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from slimlm.errors import SlimlmError, StageFailed

if TYPE_CHECKING:
    from rich.console import Console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Prune, distill, quantize and export causal LMs from a YAML recipe, with quality gates.",
)


def _stdout() -> Console:
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)  # wide tables when piped or logged


SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="override a recipe value: KEY=VALUE, e.g. stages.prune.target.params=0.5"),
]


def _fail(error: SlimlmError) -> None:
    from slimlm.progress import console

    console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)  # a path may hold [x]
    raise typer.Exit(error.exit_code)


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="the recipe YAML")],
    run_dir: Annotated[
        Optional[Path], typer.Option("--run-dir", help="where to write the run (default runs/<recipe name>)")
    ] = None,
    set_: SetOption = None,
    force: Annotated[
        bool, typer.Option("--force", help="replace another recipe's run in the run directory (it says what)")
    ] = False,
) -> None:
    """Run a recipe; finished stages that have not changed are skipped."""
    from slimlm.recipe import load_recipe

    try:
        parsed = load_recipe(recipe, set_ or [])
        from slimlm.progress import quiet_libraries
        from slimlm.runner import run_recipe

        quiet_libraries()

        with _stop_on_signals():
            run_recipe(parsed, run_dir or Path("runs") / parsed.name, force=force)
    except SlimlmError as e:
        _fail(e)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        _fail(
            StageFailed(
                f"{e.strerror} while writing {e.filename or 'the run directory'}; free space (or choose a "
                "writable --run-dir) and run the same command again: finished stages are kept"
            )
        )
    except KeyboardInterrupt as e:
        from slimlm.progress import console

        name = getattr(e, "signal_name", "SIGINT")
        console.print(
            f"[yellow]interrupted[/] ({name}): finished stages and checkpoints are kept; run the same command to resume"
        )
        raise typer.Exit(getattr(e, "exit_code", 130)) from None


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGTERM (docker stop, Kubernetes, schedulers) stops a run as Ctrl-C does: run.json says `interrupted`,
    the lock is released, checkpoints stay. Signals that arrive while the run records that are ignored."""
    from slimlm.errors import Interrupted

    def stop(signum, frame):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@app.command()
def plan(recipe: Annotated[Path, typer.Argument(help="the recipe YAML")], set_: SetOption = None) -> None:
    """Validate a recipe and show what each stage will do and produce, without running anything."""
    from slimlm.evaluate.catalogue import ALWAYS_MEASURED
    from slimlm.recipe import load_recipe

    try:
        parsed = load_recipe(recipe, set_ or [])
    except SlimlmError as e:
        _fail(e)
    table = Table(title=f"{parsed.name}: teacher {parsed.model}")
    for col in ("#", "stage", "kind", "produces", "settings", "gates"):
        table.add_column(col)
    measured = ", ".join(sorted(parsed.evaluation.metric_names() | set(ALWAYS_MEASURED)))
    table.add_row("00", "teacher", "evaluate", "metrics", measured, "")
    for i, stage in enumerate(parsed.stages, 1):
        gates = "; ".join(_describe(g) for g in stage.gates)
        table.add_row(f"{i:02d}", stage.name, stage.kind, stage.produces, _settings(stage), gates)
    _stdout().print(table)


@app.command()
def status(run_dir: Annotated[Path, typer.Argument(help="a run directory")]) -> None:
    """Show which stages of a run are done (or reused), failed or pending, with their key metrics and when they were made."""
    from slimlm.evaluate.catalogue import HEADLINES
    from slimlm.report import gates_summary, read_run

    try:
        state, rows = read_run(run_dir)
    except SlimlmError as e:
        _fail(e)
    headlines = [h for h in HEADLINES if h.in_status]
    table = Table(title=f"{state['recipe']}: {state['status']} (started {state.get('started', '?')})")
    for col in ("#", "stage", "status", *(h.label for h in headlines), "gates", "produced", "seconds"):
        table.add_column(col)
    for row in rows:
        cells = [h.cell(row.metrics) for h in headlines]
        table.add_row(f"{row.index:02d}", row.name, row.status, *cells, gates_summary(row), row.produced, row.seconds)
    _stdout().print(table)
    if state.get("error"):
        _stdout().print(f"[red]last error:[/] {escape(str(state['error']))}", highlight=False)
    if state.get("warning"):
        _stdout().print(f"[yellow]note:[/] {state['warning']}", highlight=False)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run directory")]) -> None:
    """Write report.md and a self-contained report.html (tables, gate verdicts, plots) for a run."""
    from slimlm.report import write_report

    try:
        md, page = write_report(run_dir)
    except SlimlmError as e:
        _fail(e)
    _stdout().print(f"wrote {md} and {page}")


@app.command()
def generate(
    export_dir: Annotated[
        Path, typer.Argument(help="an exported ONNX directory (e.g. runs/quickstart/03-export-int8/onnx)")
    ],
    prompt: Annotated[str, typer.Argument(help="the text to continue")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 64,
    sample: Annotated[bool, typer.Option("--sample", help="sample instead of greedy decoding")] = False,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.8,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 0.95,
    seed: int = 0,
) -> None:
    """Generate from an exported model with onnxruntime only (no torch): streams tokens, reports tokens/s."""
    from slimlm.edge import GenerationStats
    from slimlm.progress import console

    model = _open_export(export_dir)
    stats = GenerationStats()
    sys.stdout.write(prompt)
    try:
        for piece in model.stream(
            prompt, max_new_tokens, stats=stats, sample=sample, temperature=temperature, top_p=top_p, seed=seed
        ):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except SlimlmError as e:  # an empty prompt, or one longer than the model's context
        sys.stdout.write("\n")
        _fail(e)
    sys.stdout.write("\n")
    console.print(
        f"[dim]{stats.new_tokens} tokens; prefill {stats.prompt_tokens} tokens in {stats.prefill_seconds:.3f}s; "
        f"decode {stats.decode_tokens_per_second:.1f} tokens/s; overall {stats.tokens_per_second:.1f} tokens/s[/]",
        highlight=False,
    )


@app.command("export-check")
def export_check(
    export_dir: Annotated[Path, typer.Argument(help="an exported ONNX directory (an export stage's onnx/ folder)")],
    prompt: Annotated[str, typer.Option(help="the text to continue")] = "Once upon a time",
    steps: Annotated[int, typer.Option(min=1, help="greedy tokens to compare")] = 24,
) -> None:
    """Run an export in the clients installed here (transformers.js, Optimum, onnxruntime-genai) and compare their
    greedy tokens and top-1 predictions with slimlm generate's. Exit 3 if a client decodes other tokens."""
    from slimlm.export.clients import check_clients, describe_verdict

    edge = _open_export(export_dir)
    try:
        prompt_ids = edge.encode(prompt)
    except SlimlmError as e:
        _fail(e)
    verdicts = check_clients(edge, prompt_ids, steps, prompt_ids)
    table = Table(title=f"{export_dir}: clients against slimlm generate")
    table.add_column("client")
    table.add_column("verdict")
    for client, verdict in verdicts.items():
        table.add_row(client, describe_verdict(verdict))
    _stdout().print(table)
    if any(v.get("checked") and not v["same_greedy_tokens"] for v in verdicts.values()):
        raise typer.Exit(3)


def _open_export(export_dir: Path):
    """The export's EdgeModel, or one line that says why the folder is not a usable export."""
    from slimlm.edge import EdgeModel
    from slimlm.errors import SourceError

    if not export_dir.is_dir():
        _fail(SourceError(f"{export_dir} is not a folder; point at the onnx/ folder of an export stage"))
    if (export_dir / "model.gguf").is_file():
        _fail(
            SourceError(
                f"{export_dir} is a GGUF export, which runs in llama.cpp (llama-cli -m {export_dir}/model.gguf); this command runs ONNX exports"
            )
        )
    try:
        return EdgeModel(export_dir)
    except SlimlmError as e:  # not an export, or a damaged one
        _fail(e)


def _describe(gate) -> str:
    from slimlm.evaluate.gates import describe_gate

    return describe_gate(gate)


def _settings(stage) -> str:
    from rich.markup import escape

    from slimlm.stage import describe_settings

    return escape(describe_settings(stage.settings()))  # a list's [...] is not rich markup
