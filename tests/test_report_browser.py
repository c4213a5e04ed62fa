"""The report as a person sees it: report.html of a small real run (stories260K), rendered in headless Chromium.

A probe copy of the page records the layout after load (scroll width, where the table, the plots and the
headline are); a screenshot of the real page shows whether the plots are drawn there. Skips where Debian's
`chromium` is not installed (CI installs it).
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import pytest

from slimlm.errors import GateFailed
from slimlm.recipe import load_recipe
from slimlm.runner import run_recipe
from tests.conftest import STORIES, needs_shared

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LAPTOP = (1366, 2400)  # a laptop's width; tall, so the whole report is in one screenshot
pytestmark = [
    pytest.mark.heavy,
    needs_shared(STORIES),
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"),
]

RECIPE = f"""\
name: stories
model: {STORIES}
device: cpu
data:
  calibration: {{source: "builtin:python-docs", split: train, seq_len: 64, samples: 4}}
  eval: {{source: "builtin:python-docs", split: test, seq_len: 64}}
evaluation:
  perplexity: {{data: eval, max_tokens: 512}}
  agreement: {{data: eval, max_tokens: 256}}
  speed: {{prompt_tokens: 16, new_tokens: 8, batch_size: 2}}  # the quickstart's columns: the widest table
  lm_eval:
    batch_size: 4
    tasks: [{{name: docs_cloze, data: eval, context_words: 16, continuation_words: 4, limit: 12}}]
stages:
  - name: prune
    kind: prune
    target: {{params: 0.7}}
    search: {{candidates: 2, proxy_samples: 1}}
    round_to: 8
    gates:
      - {{metric: perplexity, max_ratio: 100.0, relative_to: teacher}}
  - name: half
    kind: cast
    dtype: bfloat16
"""

PROBE = """
<script>
addEventListener('load', () => {
  const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top + scrollY, r.width, r.height]; };
  const headline = document.getElementById('headline');
  document.body.setAttribute('data-probe', JSON.stringify({
    scrollWidth: document.documentElement.scrollWidth, clientWidth: document.documentElement.clientWidth,
    table: box(document.getElementById('stages')),
    images: [...document.images].map(i => [...box(i), i.naturalWidth]),
    headline: headline.innerText, headlineColor: getComputedStyle(headline).color,
  }));
});
</script>
"""


def _chromium(*args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
    flags += [f"--window-size={LAPTOP[0]},{LAPTOP[1]}", "--hide-scrollbars", "--virtual-time-budget=5000"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


def seen_in_chromium(report, tmp_path) -> tuple[dict, object]:
    """The page's layout after load in Chromium at a laptop's width, and a screenshot of it (a PIL image)."""
    from PIL import Image

    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    dom = _chromium("--dump-dom", probe.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'data-probe="([^"]*)"', dom.stdout)
    assert found, "the probe did not run: " + dom.stdout[:500]
    layout = json.loads(html.unescape(found.group(1)))  # an attribute's value, as Chromium serialises it
    shot = tmp_path / "report.png"
    screen = _chromium(f"--screenshot={shot}", report.as_uri())
    assert screen.returncode == 0 and shot.is_file(), screen.stderr[-2000:]
    return layout, Image.open(shot).convert("RGB")


def drawn(image, box) -> bool:
    """Whether a region of the screenshot holds a drawing: many colours, and more than a sliver not white."""
    left, top, width, height = (int(v) for v in box[:4])
    region = image.crop((left, top, left + width, top + height))
    pixels = list(region.get_flattened_data()) if hasattr(region, "get_flattened_data") else list(region.getdata())
    ink = sum(1 for p in pixels if min(p) < 200) / max(len(pixels), 1)
    return width > 100 and height > 100 and len(set(pixels)) > 50 and ink > 0.01


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    (root / "r.yaml").write_text(RECIPE)
    run_recipe(load_recipe(root / "r.yaml"), root / "run")
    return root / "run"


def test_the_report_of_a_real_run_reads_in_a_browser_at_laptop_width(finished_run, tmp_path):
    layout, screenshot = seen_in_chromium(finished_run / "report.html", tmp_path)
    assert layout["scrollWidth"] <= layout["clientWidth"] == LAPTOP[0], layout  # no horizontal scrolling
    left, top, width, height = layout["table"]
    assert 0 <= left and left + width <= LAPTOP[0] and height > 60  # the stage table, all of it on screen
    assert len(layout["images"]) == 2  # quality vs size, and task accuracy
    for box in layout["images"]:
        assert box[4] > 0, "a plot did not load"
        assert box[1] + box[3] <= LAPTOP[1], "a plot is below the screenshot; make LAPTOP taller"
        assert drawn(screenshot, box), f"the plot at {box} is blank on screen"
    assert layout["headline"] == "The run finished; every gate passed."


def test_a_failed_gate_is_the_headline_in_red(tmp_path):
    (tmp_path / "r.yaml").write_text(
        RECIPE.replace("{metric: perplexity, max_ratio: 100.0, relative_to: teacher}", "{metric: params, max: 1000}")
    )
    with pytest.raises(GateFailed):
        run_recipe(load_recipe(tmp_path / "r.yaml"), tmp_path / "run")
    layout, _ = seen_in_chromium(tmp_path / "run" / "report.html", tmp_path)
    assert layout["headline"].startswith("The run stopped at stage 'prune' (gate_failed): gate 'params <= 1000'")
    assert layout["headlineColor"] == "rgb(170, 0, 0)"  # .stopped
    assert layout["scrollWidth"] <= layout["clientWidth"]
