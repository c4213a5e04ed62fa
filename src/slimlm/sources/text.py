"""Where text comes from, and how it becomes fixed-length token blocks.

Sources: a local .txt or .raw file (one continuous text), .jsonl or .parquet (one document per
record, `field` names the column), `hf:NAME[:CONFIG]` (a Hugging Face dataset), and
`builtin:python-docs` (the CPython documentation topics in `pydoc_data`, present in every Python).
Record sources without their own splits get a deterministic train/test split by document hash; a
text file is split into a head (train) and a tail (test) instead.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from slimlm.errors import SourceError

if TYPE_CHECKING:
    import torch

    from slimlm.sources.specs import DataSpec

BUILTIN_PYTHON_DOCS = "builtin:python-docs"


def load_documents(spec: DataSpec) -> list[str]:
    """The documents of a data source, restricted to the spec's split."""
    source = spec.source
    if source == BUILTIN_PYTHON_DOCS:
        return split_documents(python_docs(), spec.split, spec.test_fraction)
    if source.startswith("hf:"):
        return hf_dataset(source[3:], spec.split, spec.field)
    if source.startswith("builtin:"):
        raise SourceError(f"unknown builtin data source {source!r}; available: {BUILTIN_PYTHON_DOCS}")
    path = Path(source).expanduser()
    check_data_file(path, source)
    if path.suffix == ".txt" or path.suffix == ".raw":
        return split_text(path.read_text(encoding="utf-8", errors="replace"), spec, source)
    if path.suffix == ".jsonl":
        docs = _jsonl_field(path, spec.field)
    elif path.suffix == ".parquet":
        docs = _parquet_field(path, spec.field)
    else:
        raise SourceError(f"data file {source}: unsupported type {path.suffix!r}; use .txt, .jsonl or .parquet")
    docs = [d for d in docs if d]
    if not docs:
        raise SourceError(f"data file {source} holds no text")
    return split_documents(docs, spec.split, spec.test_fraction)


def check_data_file(path: Path, source: str) -> None:
    """A data source must be a regular file: a folder, a FIFO or a device (/dev/zero never ends) is refused."""
    if path.is_dir():
        raise SourceError(f"data source {source} is a directory; give a .txt, .jsonl or .parquet file inside it")
    if not path.exists():
        raise SourceError(
            f"data file {source} does not exist (relative paths are resolved against the current directory)"
        )
    if not path.is_file():
        raise SourceError(
            f"data source {source} is not a regular file (a pipe, socket or device); copy the text into a file"
        )


def split_text(text: str, spec: DataSpec, source: str) -> list[str]:
    """A text file as one document per split: train is its head, test its tail, cut at a paragraph break
    (or a line break where the text has no blank lines, as WikiText's raw files do).

    Why not one document per paragraph: blank lines separate paragraphs as well as stories or
    articles, so hash-splitting them would scatter a story's paragraphs across train and test and
    put EOS between them, text no model was trained on (stories260K scored 7.7 held-out perplexity
    on TinyStories split that way, and 5.9 on the file's tail read as it is written).
    """
    text = text.strip()
    if not text:
        raise SourceError(f"data file {source} holds no text")
    if spec.split == "all":
        return [text]
    _check_local_split(spec.split)
    mark = int(len(text) * (1 - spec.test_fraction))
    cut = next((i for i in (text.find("\n\n", mark), text.find("\n", mark)) if i >= 0), len(text))
    head, tail = text[:cut].strip(), text[cut:].strip()
    if not head or not tail:
        raise SourceError(
            f"data file {source} is too short to split into train and test; use split: all, or a longer file"
        )
    return [head if spec.split == "train" else tail]


def split_documents(docs: list[str], split: str, test_fraction: float) -> list[str]:
    """Deterministic split by a hash of each document, so it is stable across runs and machines."""
    if split == "all":
        return docs
    _check_local_split(split)

    def is_test(doc: str) -> bool:
        bucket = int.from_bytes(hashlib.sha256(doc.encode()).digest()[:8], "big") / 2**64
        return bucket < test_fraction

    return [d for d in docs if is_test(d) == (split == "test")]


def _check_local_split(split: str) -> None:
    if split not in ("train", "test"):
        raise SourceError(f"split {split!r} is only available for hf: datasets; local sources have train, test and all")


def python_docs() -> list[str]:
    """The CPython documentation topics, split into paragraph groups of a few hundred words."""
    from pydoc_data.topics import topics

    docs: list[str] = []
    for key in sorted(topics):
        chunk: list[str] = []
        for para in topics[key].split("\n\n"):
            chunk.append(para)
            if sum(len(p.split()) for p in chunk) >= 200:
                docs.append("\n\n".join(chunk).strip())
                chunk = []
        if chunk:
            docs.append("\n\n".join(chunk).strip())
    return [d for d in docs if d]


def _jsonl_field(path: Path, name: str) -> list[str]:
    docs = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise SourceError(f"{path}:{lineno}: not UTF-8 text; save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict) or name not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise SourceError(f"{path}:{lineno}: no field {name!r} (found {keys}); set `field:` in the data spec")
            docs.append(_text_value(record[name], f"{path}:{lineno}: field {name!r}"))
    return docs


def _parquet_field(path: Path, name: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise SourceError(f"{path} is not a readable parquet file ({str(e).splitlines()[0][:200]})") from None
    if name not in table.column_names:
        raise SourceError(f"{path}: no column {name!r} (found {table.column_names}); set `field:` in the data spec")
    values = table.column(name).to_pylist()
    return [_text_value(v, f"{path}: row {row} of column {name!r}") for row, v in enumerate(values, 1)]


def _text_value(value, where: str) -> str:
    """A record's text must be a string: null, a number or an object would otherwise be scored as "None" or "3"."""
    if not isinstance(value, str):
        shown = "null" if value is None else type(value).__name__
        raise SourceError(f"{where} is {shown}, not text; every record's text field must be a string")
    return value


def hf_dataset(name: str, split: str, text_field: str) -> list[str]:
    """A Hugging Face dataset split: `hf:wikitext:wikitext-2-raw-v1` with split `test`."""
    import datasets

    path, _, config = name.partition(":")
    split = "train" if split == "all" else split
    try:
        ds = datasets.load_dataset(path, config or None, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types for missing/offline data
        raise SourceError(f"cannot load dataset {name!r} split {split!r}: {type(e).__name__}: {str(e)[:200]}") from e
    if text_field not in ds.column_names:
        raise SourceError(f"dataset {name}: no column {text_field!r} (found {ds.column_names}); set `field:`")
    texts = [
        _text_value(v, f"dataset {name}: row {row} of column {text_field!r}") for row, v in enumerate(ds[text_field], 1)
    ]
    return [t for t in texts if t.strip()]


def token_stream(docs: list[str], tokenizer, max_tokens: int | None = None) -> list[int]:
    """Documents tokenized and concatenated with EOS between them, cut at max_tokens."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in docs:
        for piece in _pieces(doc):
            stream.extend(tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"])
            if max_tokens is not None and len(stream) >= max_tokens:
                return stream[:max_tokens]
        if eos is not None:
            stream.append(eos)
    return stream


def _pieces(doc: str, size: int = 65_536) -> list[str]:
    """A long document (a whole text file) in pieces cut after a line break, so that a small token budget
    does not tokenize all of it; a cut costs at most one token's context every `size` characters."""
    pieces, start = [], 0
    while len(doc) - start > size:
        end = doc.find("\n", start + size) + 1 or len(doc)
        pieces.append(doc[start:end])
        start = end
    return [*pieces, doc[start:]] if start < len(doc) else pieces


def pack_tokens(stream: list[int], seq_len: int, *, bos_id: int | None = None) -> torch.Tensor:
    """Cut a token stream into [n, seq_len] blocks; a trailing partial block is dropped.

    With `bos_id`, each block starts with BOS followed by seq_len-1 stream tokens
    (Gemma's perplexity collapses without it).
    """
    import torch

    body = seq_len - 1 if bos_id is not None else seq_len
    n = len(stream) // body
    if n == 0:
        raise SourceError(
            f"the data holds {len(stream)} tokens, fewer than one block of {seq_len}; "
            "use more text or a smaller seq_len"
        )
    blocks = torch.tensor(stream[: n * body], dtype=torch.long).view(n, body)
    if bos_id is not None:
        blocks = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), blocks], dim=1)
    return blocks


@dataclass
class DataStore:
    """The recipe's named data sources, loaded lazily and cached for the run.

    `source: generate` needs the teacher (`teacher_dir`) and caches what it generated under
    `cache_dir`, keyed by the generation settings, so a re-run does not sample again.
    """

    specs: dict[str, DataSpec]
    teacher_dir: Path | None = None
    cache_dir: Path | None = None
    _docs: dict[str, list[str]] = field(default_factory=dict)

    def documents(self, name: str) -> list[str]:
        if name not in self._docs:
            if name not in self.specs:
                raise SourceError(f"no data source named {name!r}; the recipe's data section has {sorted(self.specs)}")
            spec = self.specs[name]
            if spec.source == "generate":
                from slimlm.sources.generate import generated_documents

                prompts = self.documents(spec.generate.prompts) if spec.generate.prompts else None
                self._docs[name] = generated_documents(spec.generate, self.teacher_dir, prompts, self.cache_dir)
            else:
                self._docs[name] = load_documents(spec)
        return self._docs[name]

    def stream(self, name: str, tokenizer, max_tokens: int | None = None) -> torch.Tensor:
        import torch

        return torch.tensor(token_stream(self.documents(name), tokenizer, max_tokens), dtype=torch.long)

    def blocks(
        self, name: str, tokenizer, *, bos_per_window: bool, seq_len: int | None = None, max_tokens: int | None = None
    ) -> torch.Tensor:
        """Token blocks of the named source; `samples` in its spec caps their number."""
        spec = self.specs[name]
        seq_len = seq_len or spec.seq_len
        limit = max_tokens or (spec.samples * seq_len if spec.samples else None)
        bos_id = None
        if bos_per_window:
            bos_id = tokenizer.bos_token_id
            if bos_id is None:
                raise SourceError(
                    "this model family needs a BOS token at each window start, but the tokenizer has none"
                )
        blocks = pack_tokens(token_stream(self.documents(name), tokenizer, limit), seq_len, bos_id=bos_id)
        return blocks[: spec.samples] if spec.samples else blocks
