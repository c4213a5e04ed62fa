"""The run report: written after every run, self-contained, and it shows where and why a run stopped."""

from __future__ import annotations

import html
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slimlm.cli import app
from slimlm.errors import GateFailed
from slimlm.recipe import load_recipe
from slimlm.runner import run_recipe
from tests.test_runner import RECIPE

EVALUATION = """\
evaluation:
  perplexity: {data: eval, max_tokens: 256}
  agreement: {data: eval, max_tokens: 128}
  lm_eval:
    batch_size: 4
    tasks: [{name: docs_cloze, data: eval, context_words: 16, continuation_words: 4, limit: 8}]
"""


class Page(HTMLParser):
    """Collects table rows (class and cell texts) and image sources."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[str, list[str]]] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self._cells: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr":
            self.rows.append((attrs.get("class") or "", []))
        elif tag in ("td", "th"):
            self._cells = self.rows[-1][1]
            self._cells.append("")
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag in ("link", "script"):
            self.links.append(attrs.get("href") or attrs.get("src") or "inline")

    def handle_data(self, data):
        if self._cells is not None:
            self._cells[-1] += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._cells = None


@pytest.fixture
def failed_run(tmp_path, tiny_llama) -> Path:
    text = RECIPE.format(model=tiny_llama).replace(
        "evaluation:\n  perplexity: {data: eval, max_tokens: 256}\n", EVALUATION
    )
    recipe_file = tmp_path / "tiny.yaml"
    recipe_file.write_text(text)
    recipe = load_recipe(recipe_file, ["stages.prune.gates.1.max=1000"])
    with pytest.raises(GateFailed):
        run_recipe(recipe, tmp_path / "run")
    return tmp_path / "run"


def test_the_report_of_a_failed_gate_shows_the_stage_the_gate_and_the_measurement(failed_run):
    page = Page()
    page.feed((failed_run / "report.html").read_text())
    header = page.rows[0][1]
    by_stage = {cells[1]: (css, dict(zip(header, cells, strict=True))) for css, cells in page.rows[1:4]}
    assert set(by_stage) == {"teacher", "prune", "half"}
    css, prune = by_stage["prune"]
    assert css == "failed" and prune["status"] == "gate failed" and "FAILED: params <= 1000" in prune["gates"]
    assert by_stage["half"][1]["status"] == "pending"
    assert float(by_stage["teacher"][1]["docs_cloze acc"]) >= 0 and prune["top-1 agreement"]
    verdicts = [cells for css, cells in page.rows if len(cells) == 4 and cells[0] == "params <= 1000"]
    assert verdicts and verdicts[0][3] == "FAIL" and verdicts[0][2] == "<= 1000"
    assert "The run stopped at stage 'prune' (gate_failed): gate 'params <= 1000'" in html.unescape(
        (failed_run / "report.html").read_text()
    )
    # self-contained: plots are inlined, nothing is fetched
    assert len(page.images) == 2 and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert page.links == []
    markdown = (failed_run / "report.md").read_text()
    assert "| params <= 1000 |" in markdown and "FAIL" in markdown


def test_slimlm_report_rewrites_the_report_and_explains_a_wrong_directory(failed_run, tmp_path):
    (failed_run / "report.html").unlink()
    result = CliRunner().invoke(app, ["report", str(failed_run)])
    assert result.exit_code == 0, result.output
    assert (failed_run / "report.html").is_file()
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "nowhere does not exist" in result.output


def test_after_a_rerun_that_reuses_everything_the_report_and_status_show_what_was_produced(tmp_path, tiny_llama):
    """A rerun that skips every stage reports each as done (reused), when it was made and how long it took then."""
    import json
    import time

    from tests.conftest import run_cli

    recipe_file = tmp_path / "tiny.yaml"
    recipe_file.write_text(RECIPE.format(model=tiny_llama))
    run_recipe(load_recipe(recipe_file), tmp_path / "run")
    first = {d.name: json.loads((d / "manifest.json").read_text()) for d in (tmp_path / "run").glob("0*") if d.is_dir()}
    time.sleep(1.1)  # the rerun's clock differs from the first run's
    run_recipe(load_recipe(recipe_file), tmp_path / "run")
    page = Page()
    page.feed((tmp_path / "run" / "report.html").read_text())
    header = page.rows[0][1]
    rows = {cells[1]: dict(zip(header, cells, strict=True)) for _, cells in page.rows[1:4]}
    for folder, manifest in first.items():
        row = rows[folder[3:]]
        assert row["status"] == "done (reused)"
        assert row["produced"] == manifest["finished"].replace("T", " ")[:16]
        assert row["seconds"] == str(manifest["seconds"])
    text = html.unescape((tmp_path / "run" / "report.html").read_text())

    def shown(iso):
        return iso.replace("T", " ").replace("+00:00", " UTC")

    made = sorted(m["finished"] for m in first.values())
    state = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (
        f"Artifacts made between {shown(made[0])} and {shown(made[-1])}; this run started {shown(state['started'])}"
        in text
    )
    assert state["started"] > made[-1]  # the header tells the two apart
    code, out = run_cli("status", tmp_path / "run")
    assert code == 0 and out.count("done (reused)") == 3 and "produced" in out
