"""Text sources: resolve a spec string into documents, and documents into one token stream.

One resolver for every place that needs text, so ``--data`` on the command line means the same in
``eval`` and ``calibrate``; `encode_texts` joins documents with eos for both. Spec strings:

- ``builtin:code``, ``builtin:prose``, ``builtin:mixed``: the offline stdlib corpora
  (:mod:`moeprune.calibration.builtin_corpus`); ``split`` is the corpus split (default ``heldout``).
- a local path: a directory (every ``*.txt`` file, sorted, is one document), a ``.txt`` file
  (documents separated by blank lines) or a ``.jsonl`` file (one JSON object per line, field
  ``text``). ``split`` is ignored.
- ``hf:NAME``, ``hf:NAME:CONFIG`` or a bare ``NAME`` that is not a local path: a Hugging Face
  dataset via ``datasets.load_dataset(NAME, CONFIG, split=split)``, column ``text``; ``split`` is
  the dataset split (default ``train``). For the file-based builders ``json``, ``text``, ``csv``
  and ``parquet`` the part after the colon is the data file: ``hf:json:/data/eval.jsonl``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

_FILE_BUILDERS = frozenset({"json", "text", "csv", "parquet"})
_BLANK_LINES = re.compile(r"\n[ \t]*\n")


def load_texts(source: str, split: str | None = None, max_docs: int | None = None) -> list[str]:
    """Documents named by ``source`` (see module docstring), non-empty, at most ``max_docs``.

    Args:
        source: spec string.
        split: corpus split for ``builtin:`` (default ``"heldout"``), dataset split for Hugging Face
            datasets (default ``"train"``); ignored for local files.
        max_docs: keep only the first ``max_docs`` documents.
    """
    if max_docs is not None and max_docs < 0:
        raise ValueError("max_docs must be >= 0")
    if source.startswith("builtin:"):
        # The stdlib corpora (a dependency-free leaf module) still live in calibration/.
        from moeprune.calibration.builtin_corpus import builtin_documents

        docs = builtin_documents(source.split(":", 1)[1], split or "heldout")
    elif Path(source).exists():
        docs = _load_local(Path(source))
    else:
        docs = _load_hf(source[3:] if source.startswith("hf:") else source, split or "train", max_docs)
    docs = [d for d in docs if d and d.strip()]
    return docs if max_docs is None else docs[:max_docs]


def _load_local(path: Path) -> list[str]:
    if path.is_dir():
        return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(path.glob("*.txt"))]
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "text" not in record:
                raise ValueError(f"{path}:{lineno}: JSON object has no 'text' field")
            docs.append(str(record["text"]))
        return docs
    if path.suffix == ".txt":
        return [doc.strip("\n") for doc in _BLANK_LINES.split(path.read_text(encoding="utf-8"))]
    raise ValueError(f"unsupported local text file {path} (expected a directory, .txt or .jsonl)")


def _load_hf(spec: str, split: str, max_docs: int | None) -> list[str]:
    import datasets  # heavy import, only when needed

    name, _, rest = spec.partition(":")
    if not name:
        raise ValueError(f"empty dataset name in text source {spec!r}")
    if name in _FILE_BUILDERS:
        if not rest:
            raise ValueError(f"hf:{name} needs a data file: hf:{name}:/path/to/file")
        ds = datasets.load_dataset(name, data_files={split: rest}, split=split)
    else:
        ds = datasets.load_dataset(name, rest or None, split=split)
    if "text" not in ds.column_names:
        raise ValueError(f"dataset {spec!r} has no 'text' column (columns: {ds.column_names})")
    if max_docs is not None:
        ds = ds.select(range(min(len(ds), max_docs * 2)))  # headroom for empty rows
    return [str(t) for t in ds["text"]]


def encode_texts(tokenizer, texts: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """Tokenise ``texts`` and join them with the eos token id; returns a 1-D LongTensor."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; cannot join documents")
    ids: list[int] = []
    for i, text in enumerate(texts):
        if i:
            ids.append(eos)
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)
