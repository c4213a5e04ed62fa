"""The run report: `report.md` and a self-contained `report.html` (plots inlined) from a run directory's manifests.

Written at the end of every run, failed ones included (the report says where and why it stopped),
and on demand by `slimlm report RUN_DIR`. It reads only files, so it also works on a run that
another machine produced.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from slimlm import safe_yaml
from slimlm.artifacts import MANIFEST, RunLayout, read_json, run_state
from slimlm.errors import RunDirectoryError
from slimlm.evaluate.catalogue import HEADLINES, PARAMS, SIZE, TASK_HEADLINES
from slimlm.evaluate.gates import describe_verdict
from slimlm.manifest import GateVerdict, Manifest, manifest_problem, read_manifest, stage_manifest


@dataclass
class StageRow:
    index: int
    name: str
    kind: str
    status: str  # done, done (reused), gate failed, failed, running, interrupted, pending, finished earlier
    manifest: Manifest | None = None

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.metrics if self.manifest else {}

    @property
    def gates(self) -> list[GateVerdict]:
        return self.manifest.gates if self.manifest else []

    @property
    def failed_gates(self) -> list[GateVerdict]:
        return [v for v in self.gates if not v.passed]

    @property
    def seconds(self) -> str:
        """How long the stage took when it produced its artifact (a rerun that reuses it takes none)."""
        return str(self.manifest.seconds) if self.manifest else ""

    @property
    def produced(self) -> str:
        """When the artifact was made: `2026-12-01 12:03` (UTC)."""
        return _time(self.manifest.finished)[:16] if self.manifest and self.manifest.finished else ""


def read_run(run_dir: Path) -> tuple[dict[str, Any], list[StageRow]]:
    """The run's state and one row per stage (teacher first) in recipe order, with what is known of each."""
    layout = RunLayout(Path(run_dir))
    state = _run_state_or_error(layout)
    order = _recipe_order(layout)
    if order is None:  # recipe.yaml is damaged: the stage folders on disk still say what ran, in order
        order = [(0, "teacher", "teacher")] + [
            (int(d.name[:2]), d.name[3:], getattr(read_manifest(d / MANIFEST), "kind", "")) for d in layout.stage_dirs()
        ]
        state = {**state, "warning": f"{layout.recipe.name} is damaged; stages are listed from their folders"}
    rows = []
    for i, name, kind in order:
        manifest = stage_manifest(layout, i, name)
        path = layout.stage_dir(i, name) / MANIFEST
        if path.exists() and manifest is None:
            raise RunDirectoryError(
                f"{path} is damaged ({manifest_problem(read_json(path))}); run the recipe again to rebuild that stage"
            )
        last = state["stages"].get(name)
        shown = last or ("finished earlier" if manifest else "pending")
        if last == "skipped" and manifest:  # this run found the artifact unchanged: it is what the stage produced
            shown = "done (reused)"
        if (manifest and manifest.status == "gate_failed") or last == "gate_failed":
            shown = "gate failed"
        elif last == "running":
            shown = state["status"] if state["status"] in ("failed", "interrupted") else "running"
        rows.append(StageRow(i, name, kind or getattr(manifest, "kind", ""), shown, manifest))
    return state, rows


def _run_state_or_error(layout: RunLayout) -> dict[str, Any]:
    """The run's run.json, or one line that says why `layout.root` is not a readable run."""
    root = layout.root
    if not root.exists():
        raise RunDirectoryError(f"{root} does not exist; give a run directory (runs/<recipe name> by default)")
    if not root.is_dir():
        raise RunDirectoryError(f"{root} is a file, not a run directory (runs/<recipe name> by default)")
    if not layout.run_state.exists():
        raise RunDirectoryError(f"{root} is not a slimlm run directory (it has no run.json)")
    state = run_state(root)
    if state is None:
        raise RunDirectoryError(
            f"{layout.run_state} is damaged (not the JSON record slimlm writes); "
            "run the recipe again into this directory to rewrite it"
        )
    return state


def _recipe_order(layout: RunLayout) -> list[tuple[int, str, str]] | None:
    """(index, name, kind) of the teacher and every stage of the run's recipe.yaml, or None where it cannot be read."""
    try:
        stages = safe_yaml.load(safe_yaml.read_text(layout.recipe)).get("stages")
        return [(0, "teacher", "teacher")] + [(i, str(s["name"]), str(s["kind"])) for i, s in enumerate(stages, 1)]
    except (OSError, ValueError, yaml.YAMLError, AttributeError, KeyError, TypeError):
        return None


def write_report(run_dir: Path) -> tuple[Path, Path]:
    """Write report.md and report.html into the run directory; returns their paths."""
    run_dir = Path(run_dir)
    state, rows = read_run(run_dir)
    plots = _plots(rows)
    md, page = run_dir / "report.md", run_dir / "report.html"
    md.write_text(_markdown(state, rows, run_dir, plots))
    page.write_text(_html(state, rows, plots))
    return md, page


# ---------------------------------------------------------------- content


def _task_metrics(rows: list[StageRow]) -> list[tuple[str, str]]:
    """(task, metric) pairs measured anywhere in the run, the headline metric of each task first."""
    pairs: dict[tuple[str, str], None] = {}
    for row in rows:
        for task, values in row.metrics.get("tasks", {}).items():
            for metric in TASK_HEADLINES:
                if metric in values:
                    pairs[(task, metric)] = None
    return list(pairs)


def _columns(rows: list[StageRow]) -> list[tuple[str, Any]]:
    """The summary table's columns: (header, function of a row giving the cell text)."""
    teacher = rows[0].metrics if rows else {}

    def headline(h):
        if not h.versus_teacher:
            return lambda r: h.cell(r.metrics)
        reference = h.value(teacher)

        def cell(r):  # a figure and its ratio to the teacher's, measured in the same run: `12.3 (0.52x)`
            value = h.value(r.metrics)
            if value is None:
                return ""
            return format(value, h.fmt) + (f" ({value / reference:.2f}x)" if reference else "")

        return cell

    cols: list[tuple[str, Any]] = [
        ("#", lambda r: f"{r.index:02d}"),
        ("stage", lambda r: r.name),
        ("kind", lambda r: r.kind),
        ("status", lambda r: r.status),
    ]
    shown = [h for h in HEADLINES if h.metric in (SIZE, PARAMS) or any(h.value(r.metrics) is not None for r in rows)]
    cols += [(h.label, headline(h)) for h in shown if not h.metric.startswith("speed.")]
    for task, metric in _task_metrics(rows):  # task scores go between quality and speed
        cols.append((f"{task} {metric}", lambda r, t=task, m=metric: _task_cell(r, t, m)))
    cols += [(h.label, headline(h)) for h in shown if h.metric.startswith("speed.")]
    cols += [("gates", gates_summary), ("produced", lambda r: r.produced), ("seconds", lambda r: r.seconds)]
    return cols


def _task_cell(row: StageRow, task: str, metric: str) -> str:
    value = row.metrics.get("tasks", {}).get(task, {}).get(metric)
    return "" if value is None else f"{value:.4f}"


def gates_summary(row: StageRow) -> str:
    """`2 passed`, or `FAILED:` and the gates that failed."""
    failed = row.failed_gates
    if failed:
        return "FAILED: " + "; ".join(v.gate for v in failed)
    return f"{len(row.gates)} passed" if row.gates else ""


def _verdict_lines(row: StageRow) -> list[tuple[str, str, str, str]]:
    return [
        (v.gate, describe_verdict(v), " and ".join(v.bounds) or "-", "pass" if v.passed else "FAIL") for v in row.gates
    ]


def _client_lines(row: StageRow) -> list[tuple[str, str]]:
    """(client, verdict) for an export that was run in its clients; the export stage records them."""
    from slimlm.export.clients import describe_verdict as describe_client

    clients = row.metrics.get("clients")
    if not isinstance(clients, dict):
        return []
    return [(c, describe_client(v)) for c, v in clients.items() if isinstance(v, dict)]


def _time(iso: str | None) -> str:
    """`2026-12-01T13:25:16+00:00` as `2026-12-01 13:25:16 UTC` (slimlm records UTC)."""
    return iso.replace("T", " ").replace("+00:00", " UTC") if iso else "-"


def _when(state: dict[str, Any], rows: list[StageRow]) -> str:
    """When the artifacts were made, and when this run (which may have reused them all) started and finished."""
    made = sorted(_time(r.manifest.finished) for r in rows if r.manifest and r.manifest.finished)
    checked = f"this run started {_time(state.get('started'))} and finished {_time(state.get('finished'))}"
    if not made:
        return f"No artifacts yet; {checked}."
    span = made[0] if made[0] == made[-1] else f"between {made[0]} and {made[-1]}"
    reused = any(r.status == "done (reused)" for r in rows)
    return f"Artifacts made {span}; {checked}" + (", reusing those marked reused." if reused else ".")


def _headline(state: dict[str, Any], rows: list[StageRow]) -> str:
    if state.get("status") == "done":
        return "The run finished; every gate passed."
    stopped = next((r for r in rows if r.status in ("gate failed", "failed", "running")), None)
    where = f" at stage '{stopped.name}'" if stopped else ""
    return f"The run stopped{where} ({state.get('status')}): {state.get('error', 'no error recorded')}"


def _markdown(state: dict[str, Any], rows: list[StageRow], run_dir: Path, plots: dict[str, bytes]) -> str:
    cols = _columns(rows)
    out = [f"# slimlm run: {state.get('recipe')}", "", _headline(state, rows), ""]
    out += [_when(state, rows), ""]
    out += ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fn(r).replace("|", "\\|") for _, fn in cols) + " |" for r in rows]
    for name, png in plots.items():
        (run_dir / f"report-{name}.png").write_bytes(png)
        out += ["", f"![{name}](report-{name}.png)"]
    for row in rows:
        lines = _verdict_lines(row)
        if lines:
            out += [
                "",
                f"## Gates after {row.name}",
                "",
                "| gate | measured | required | verdict |",
                "|---|---|---|---|",
            ]
            out += [f"| {g} | {m} | {b} | {v} |" for g, m, b, v in lines]
        clients = _client_lines(row)
        if clients:
            out += ["", f"## Clients of {row.name}", "", "| client | against slimlm generate |", "|---|---|"]
            out += [f"| {c} | {v} |" for c, v in clients]
    return "\n".join(out) + "\n"


def _html(state: dict[str, Any], rows: list[StageRow], plots: dict[str, bytes]) -> str:
    e = html.escape
    cols = _columns(rows)
    ok = state.get("status") == "done"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>slimlm: {e(str(state.get('recipe')))}</title><style>{_CSS}</style></head><body>",
        f"<h1>slimlm run: {e(str(state.get('recipe')))}</h1>",
        f"<p class='{'ok' if ok else 'stopped'}' id='headline'>{e(_headline(state, rows))}</p>",
        f"<p id='when'>{e(_when(state, rows))}</p>",
        "<table id='stages'><tr>" + "".join(f"<th>{e(h)}</th>" for h, _ in cols) + "</tr>",
    ]
    for r in rows:
        css = "failed" if r.status in ("gate failed", "failed") else ""
        parts.append(f"<tr class='{css}'>" + "".join(f"<td>{e(fn(r))}</td>" for _, fn in cols) + "</tr>")
    parts.append("</table>")
    for name, png in plots.items():
        data = base64.b64encode(png).decode()
        parts.append(f"<figure><img alt='{e(name)}' src='data:image/png;base64,{data}'></figure>")
    for row in rows:
        lines = _verdict_lines(row)
        if lines:
            parts.append(f"<h2>Gates after {e(row.name)}</h2><table class='gates'>")
            parts.append("<tr><th>gate</th><th>measured</th><th>required</th><th>verdict</th></tr>")
            for g, m, b, v in lines:
                parts.append(f"<tr class='{'failed' if v == 'FAIL' else ''}'><td>{e(g)}</td><td>{e(m)}</td>")
                parts.append(f"<td>{e(b)}</td><td class='verdict'>{v}</td></tr>")
            parts.append("</table>")
        clients = _client_lines(row)
        if clients:
            parts.append(f"<h2>Clients of {e(row.name)}</h2><table class='clients'>")
            parts.append("<tr><th>client</th><th>against slimlm generate</th></tr>")
            parts += [f"<tr><td>{e(c)}</td><td>{e(v)}</td></tr>" for c, v in clients]
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


# The stage table has a column per headline metric and task: small type and tight cells keep a quickstart's
# report inside a 1366 px laptop screen without horizontal scrolling (tests/test_report_browser.py).
_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
table#stages { font-size: 0.78em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.4em; text-align: right; }
th { background: #f3f3f3; } td:nth-child(2), td:first-child { text-align: left; }
tr.failed td { background: #fde8e8; } .stopped { color: #a00; font-weight: bold; } .ok { color: #060; }
img { max-width: 100%; }
"""


# ---------------------------------------------------------------- plots


def _plots(rows: list[StageRow]) -> dict[str, bytes]:
    """PNG plots: quality vs size across stages, and per-task scores per stage."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    measured = [r for r in rows if SIZE in r.metrics]
    plots: dict[str, bytes] = {}
    quality = (
        [("perplexity", "perplexity (lower is better)")] if any("perplexity" in r.metrics for r in measured) else []
    )
    tasks = [(t, m) for t, m in _task_metrics(rows) if m.startswith("acc")]
    if quality or tasks:
        panels = quality + ([("tasks", "mean task accuracy")] if tasks else [])
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
        for ax, (key, label) in zip(axes[0], panels, strict=True):
            for r in measured:
                y = r.metrics.get(key) if key != "tasks" else _mean_task_score(r, tasks)
                if y is None:
                    continue
                ax.scatter(r.metrics[SIZE] / 1e6, y, color="#c00" if r.failed_gates else "#1f5fa8")
                ax.annotate(r.name, (r.metrics[SIZE] / 1e6, y), textcoords="offset points", xytext=(4, 4))
            ax.set_xlabel("size on disk (MB)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        fig.suptitle("quality vs size")
        plots["quality-vs-size"] = _png(fig)
    if tasks:
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks) * max(1, len(measured)) / 3), 4))
        width = 0.8 / max(1, len(measured))
        for j, r in enumerate(measured):
            values = [r.metrics.get("tasks", {}).get(t, {}).get(m, 0.0) for t, m in tasks]
            ax.bar([i + j * width for i in range(len(tasks))], values, width, label=r.name)
        for i, (t, _metric) in enumerate(tasks):
            chance = next(
                (r.metrics["tasks"][t].get("chance") for r in measured if t in r.metrics.get("tasks", {})), None
            )
            if chance is not None:
                ax.hlines(chance, i - width / 2, i + 0.8 - width / 2, colors="k", linestyles="dashed")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], [f"{t}\n{m}" for t, m in tasks])
        ax.set_title("task accuracy per stage (dashed: chance)")
        ax.legend(fontsize="small")
        plots["tasks"] = _png(fig)
    series = token_series(rows)
    if series and any((r.manifest.config or {}).get("init") == "random" for r in rows if r.manifest):
        plots["tokens"] = _tokens_plot(rows, series)
    return plots


def token_series(rows: list[StageRow]) -> dict[str, list[tuple[int, float]]]:
    """Held-out perplexity by training tokens of the distill stages, one series per way of making the student:
    `prune + KD`, `random init in prune's shape + CE`, with the method and learning rate named where stages of
    one series differ in them; teacher corrections are left out."""
    groups: dict[str, dict[tuple, list[tuple[int, float]]]] = {}
    for r in rows:
        config = (r.manifest.config or {}) if r.manifest else {}
        if r.kind != "distill" or config.get("becomes_teacher") or "perplexity" not in r.metrics:
            continue
        loss = config.get("loss", {})
        kind = " + ".join(
            [
                *(["KD"] if loss.get("logits", "forward_kl") != "none" else []),
                *(["CE"] if loss.get("ce_weight") else []),
            ]
        )
        start = config.get("input") or "previous stage"
        start = f"random init in {start}'s shape" if config.get("init") == "random" else start
        point = (r.metrics.get("train_tokens", 0), r.metrics["perplexity"])
        groups.setdefault(f"{start} + {kind}", {}).setdefault((config.get("method"), config.get("lr")), []).append(
            point
        )
    series = {}
    for name, variants in groups.items():
        for (method, lr), points in variants.items():
            label = name if len(variants) == 1 else f"{name} ({method}, lr {lr:g})"
            series[label] = sorted(points)
    return dict(sorted(series.items()))


def _tokens_plot(rows: list[StageRow], series: dict[str, list[tuple[int, float]]]) -> bytes:
    """Was pruning worth it: the token series on log axes, the teacher's perplexity as a dotted line; drawn when
    a stage trains from scratch."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    for name, points in series.items():
        style = "--" if name.startswith("random init") else "-"  # the from-scratch baselines
        ax.plot([t for t, _ in points], [p for _, p in points], style, marker="o", label=name)
    for r in rows:  # the teacher, and a teacher corrected by a stage of the run
        if r.metrics.get("perplexity") is not None and (
            r.kind == "teacher" or (r.manifest and (r.manifest.config or {}).get("becomes_teacher"))
        ):
            label = "teacher" if r.kind == "teacher" else f"teacher corrected ({r.name})"
            ax.axhline(r.metrics["perplexity"], color="k", linestyle=":" if r.kind == "teacher" else "-.", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())  # the minor ticks' labels overlap at a decade's width
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the curves, not on them
    ax.set_title("pruned and distilled vs trained from scratch")
    return _png(fig)


def _mean_task_score(row: StageRow, tasks: list[tuple[str, str]]) -> float | None:
    values = [row.metrics.get("tasks", {}).get(t, {}).get(m) for t, m in tasks]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
