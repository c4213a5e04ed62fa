"""The tokenizer as llama.cpp reads it from a GGUF: vocabulary, merges or scores, special tokens, chat template,
and the pre-tokenizer's name (`tokenizer.ggml.pre`), which picks the regex llama.cpp splits text with.

A teacher read from a GGUF file keeps that file's tokenizer metadata (sources/models.py keeps it beside the
converted teacher), and an export whose tokenizer is the teacher's writes it back
unchanged. Otherwise it is derived from the HF files as llama.cpp's converter does: a SentencePiece model
(tokenizer.model) or a SentencePiece-style tokenizer.json is `llama`; a byte-level BPE is `gpt2`, with its
pre-tokenizer named from llama.cpp's fingerprint of known tokenizers or from the tokenizer.json's shape.
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf

from slimlm.errors import UnsupportedModelError
from slimlm.sources.models import tokenizer_sidecar

# llama.cpp names a BPE pre-tokenizer by the sha256 of str(token ids) of this text (its converter's check text)
FINGERPRINT_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 "
    "33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на "
    "Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll "
    "make it, 'D you like some tea? We'Ve a'lL"
)
# The fingerprints llama.cpp's converter knows for the tokenizers of the families slimlm prunes.
KNOWN_FINGERPRINTS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen 1.5 / 2 / 2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # GPT-2
}
GPT2_SPLIT = {"type": "ByteLevel", "use_regex": True}


def write_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, teacher_dir: Path, vocab_size: int) -> dict[str, Any]:
    """Write the tokenizer.* keys; return what was written: where it came from and the pre-tokenizer's name."""
    sidecar = tokenizer_sidecar(teacher_dir)
    if sidecar.is_file() and _same_tokenizer(model_dir, teacher_dir):
        fields = json.loads(sidecar.read_text())
        for key, (vtype, sub, value) in fields.items():
            writer.add_key_value(
                key, value, gguf.GGUFValueType[vtype], sub_type=gguf.GGUFValueType[sub] if sub else None
            )
        return {"origin": "the teacher's GGUF", "pre": fields.get("tokenizer.ggml.pre", [None, None, None])[2]}
    return _derive(writer, model_dir, vocab_size)


def _same_tokenizer(a: Path, b: Path) -> bool:
    def files(d: Path) -> dict[str, bytes]:
        return {n: (d / n).read_bytes() for n in ("tokenizer.json", "tokenizer.model") if (d / n).is_file()}

    return bool(files(a)) and files(a) == files(b)


def _derive(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> dict[str, Any]:
    tokenizer_json = model_dir / "tokenizer.json"
    spec = json.loads(tokenizer_json.read_text()) if tokenizer_json.is_file() else {}
    model = spec.get("model", {})
    facts: dict[str, Any] = {"origin": "derived from the HF tokenizer files"}
    if (model_dir / "tokenizer.model").is_file():
        _write_llama_vocab(writer, gguf.SentencePieceVocab(model_dir), vocab_size)
    elif model.get("type") == "BPE" and model.get("byte_fallback"):  # SentencePiece's BPE, as tokenizer.json
        _write_llama_vocab(writer, gguf.LlamaHfVocab(model_dir), vocab_size)
    elif model.get("type") == "BPE":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        tokens, types = _bpe_tokens(tokenizer, vocab_size)
        pre, found = pre_tokenizer_name(tokenizer, spec)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        facts["pre"] = pre
        if not found:
            facts["note"] = (
                "no llama.cpp pre-tokenizer name matches this tokenizer: llama.cpp splits its text with the default "
                "regex and warns that generation quality may degrade"
            )
    else:
        raise UnsupportedModelError(
            f"{model_dir} has neither tokenizer.model nor a BPE tokenizer.json, the vocabularies a GGUF holds"
        )
    special = gguf.SpecialVocab(model_dir, load_merges="pre" in facts, n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)
    return facts


def _write_llama_vocab(writer: gguf.GGUFWriter, vocab, vocab_size: int) -> None:
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    for i in range(len(tokens), vocab_size):  # an embedding table wider than the vocabulary: unused rows
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)


def _bpe_tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings by id, and their llama.cpp types: an added special token is CONTROL, another added one
    USER_DEFINED (pre-normalised, as llama.cpp expects), an id the tokenizer lacks UNUSED."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            token = added[i]
            text = (
                token.content
                if token.normalized
                else tokenizer.decode(tokenizer.encode(token.content, add_special_tokens=False))
            )
            tokens.append(token.content if token.special else text)
            types.append(gguf.TokenType.CONTROL if token.special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def pre_tokenizer_name(tokenizer, spec: dict) -> tuple[str, bool]:
    """llama.cpp's name for a byte-level BPE's pre-tokenizer: by fingerprint, else by the tokenizer.json's shape
    (a plain GPT-2 split, or SmolLM's: single digits, then GPT-2), else "default" (found: False)."""
    ids = tokenizer.encode(FINGERPRINT_TEXT)
    name = KNOWN_FINGERPRINTS.get(sha256(str(ids).encode()).hexdigest())
    if name:
        return name, True
    steps = spec.get("pre_tokenizer") or {}
    steps = steps.get("pretokenizers", [steps]) if steps.get("type") == "Sequence" else [steps]
    shape = [{k: s.get(k) for k in ("type", "use_regex", "individual_digits") if k in s} for s in steps]
    if shape == [GPT2_SPLIT]:
        return "gpt-2", True
    if shape == [{"type": "Digits", "individual_digits": True}, GPT2_SPLIT]:
        return "smollm", True
    return "default", False
