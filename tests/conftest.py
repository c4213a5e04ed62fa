"""Tiny models of every supported family, built from a config in code, with a BPE tokenizer trained here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Export stages run every installed client (slimlm/export/clients.py). The fast suite points them at an empty
# folder; tests/export/test_clients.py (pytest -m clients) points them back at the real ones.
INSTALLED_CLIENTS = os.environ.get("SLIMLM_CLIENTS")
os.environ["SLIMLM_CLIENTS"] = str(Path(__file__).parent / "no-clients-installed")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"

# Small but not degenerate: 4 query heads in 2 KV groups, head_dim 16, 4 layers.
COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_hidden_layers=4,
    max_position_embeddings=512,
)
FAMILIES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True)),
    "gemma2": (
        "Gemma2Config",
        dict(query_pre_attn_scalar=16, sliding_window=32, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    ),
    "gemma3_text": ("Gemma3TextConfig", dict(query_pre_attn_scalar=16, sliding_window=32)),
    # as Phi-3-mini-4k: no LongRoPE (onnxruntime-genai's builder reads a longer context as LongRoPE)
    "phi3": ("Phi3Config", dict(tie_word_embeddings=False, original_max_position_embeddings=512)),
}


def needs_shared(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is absent (../shared is not beside this checkout)")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 512-token byte-level BPE tokenizer trained on Python's docs (always present, no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from slimlm.sources.text import python_docs

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<bos>", "<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(python_docs(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return out


def build_tiny(family: str, tokenizer_dir: Path, out: Path, seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised tiny model of `family` (with the shared tokenizer) as an HF directory."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cls_name, extra = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = getattr(transformers, cls_name)(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**COMMON, **extra, **overrides},
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger-than-default weights so that pruning choices change the outputs visibly
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: build_tiny(family, tokenizer_dir, root / family) for family in FAMILIES}


@pytest.fixture
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def tiny_export(tiny_models, tmp_path_factory) -> Path:
    """The tiny Llama exported once at fp32 (model.onnx, external data, config, tokenizer)."""
    from transformers import AutoModelForCausalLM

    from slimlm.export.onnx_graph import export_onnx

    out = tmp_path_factory.mktemp("export") / "onnx"
    export_onnx(AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval(), tiny_models["llama"], out)
    return out


# ---------------------------------------------------------------- the CLI as a user meets it


def run_cli(*args: str) -> tuple[int, str]:
    """Invoke `slimlm ARGS` in this process; (exit code, everything it printed). Fails on a traceback."""
    from typer.testing import CliRunner

    from slimlm.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    output = result.output  # stdout and stderr as a terminal shows them
    assert "Traceback" not in output, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, output


def file_snapshot(root: Path) -> dict[str, bytes]:
    """Every regular file under `root` and its content, to show afterwards that nothing was lost or changed."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def assert_kept(before: dict[str, bytes], root: Path) -> None:
    after = file_snapshot(root)
    lost = [name for name in before if name not in after]
    changed = [name for name in before if name in after and after[name] != before[name]]
    assert not lost and not changed, f"lost {lost}, changed {changed}"


def assert_one_clear_error(args: list, root: Path, message: str, code: int = 2) -> str:
    """`slimlm ARGS` ends with exit `code` and one error line containing `message`, and every file under
    `root` that was there before is still there, unchanged. Returns the output."""
    before = file_snapshot(root)
    exit_code, output = run_cli(*args)
    assert exit_code == code, output
    assert message in output.replace("\n", ""), output  # rich wraps long lines
    assert output.count("error:") == 1, output
    assert_kept(before, root)
    return output
