"""Offline text corpora built from the running CPython installation.

Calibrating and evaluating a pruned MoE needs real text, and tests and the bundled model must work
without network access. Every CPython install ships two usable kinds of text:

* ``code``: the standard library's ``.py`` sources (tests and site-packages excluded);
* ``prose``: the ``pydoc_data.topics`` help texts, long stdlib docstrings (one document per
  source file), ``LICENSE.txt`` and ``idlelib/NEWS*.txt``.

Documents are split into ``train`` and ``heldout`` by file, never by line, using the md5 of a
stable key (the path relative to the stdlib, or ``topic:<name>``): about 4% of code files and
about 1/7 of prose documents are held out. A file's docstrings follow that file's split, so no
held-out file leaks into training through its docstrings. Texts repeated verbatim are kept once.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import sysconfig
import tokenize
from pathlib import Path
from typing import Literal

Domain = Literal["code", "prose"]
Split = Literal["train", "heldout", "all"]

DOMAINS: tuple[str, ...] = ("code", "prose", "mixed")
# Text of moeprune's dependencies, never trained on (moeprune.calibration.third_party_corpus).
THIRD_PARTY_DOMAINS: tuple[str, ...] = ("third-party-code", "third-party-prose", "third-party-mixed")
# the models' own kind of text and the third-party text, half of the characters each, interleaved
# (a broad router-KD source)
BROAD_DOMAIN = "broad-mixed"
SPLITS: tuple[str, ...] = ("train", "heldout", "all")

_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
_CODE_HELDOUT_PERCENT = 4  # of 100 md5 buckets
_PROSE_HELDOUT_MODULUS = 7  # one bucket in seven
_MIN_DOCSTRING_CHARS = 200


def _bucket(key: str, modulus: int) -> int:
    return int(hashlib.md5(key.encode("utf-8")).hexdigest(), 16) % modulus


def _code_is_heldout(relpath: str) -> bool:
    return _bucket(relpath, 100) < _CODE_HELDOUT_PERCENT


def _prose_is_heldout(key: str) -> bool:
    return _bucket(key, _PROSE_HELDOUT_MODULUS) == 0


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _read_source(path: Path) -> str | None:
    """Read a Python source honouring its encoding cookie; None if unreadable."""
    try:
        with tokenize.open(path) as fh:
            return fh.read()
    except (OSError, SyntaxError, UnicodeDecodeError):
        try:
            return path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None


def _docstrings(source: str) -> list[str]:
    """Module/class/function docstrings longer than the threshold, in source order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > _MIN_DOCSTRING_CHARS:
                found.append(doc)
    return found


@functools.lru_cache(maxsize=1)
def _scan() -> dict[str, tuple[tuple[str, bool], ...]]:
    """Scan the stdlib once: per domain, (document text, is_heldout) in deterministic order."""
    root = _stdlib_root()
    paths = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if not _EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])
    )
    code: list[tuple[str, bool]] = []
    doc_prose: list[tuple[str, bool]] = []
    for rel in paths:
        text = _read_source(root / rel)
        if not text or not text.strip():
            continue
        heldout = _code_is_heldout(rel)
        code.append((text, heldout))
        docs = _docstrings(text)
        if docs:
            doc_prose.append(("\n\n".join(docs), heldout))

    prose: list[tuple[str, bool]] = []
    try:
        from pydoc_data.topics import topics  # type: ignore[import-not-found]
    except ImportError:  # pragma: no cover - stripped-down Python builds
        topics = {}
    for name in sorted(topics):
        text = topics[name]
        if text and text.strip():
            prose.append((text, _prose_is_heldout(f"topic:{name}")))
    prose.extend(doc_prose)
    extra = [root / "LICENSE.txt", *sorted((root / "idlelib").glob("NEWS*.txt"))]
    for path in extra:
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                prose.append((text, _prose_is_heldout(path.relative_to(root).as_posix())))
    return {"code": _dedupe(code), "prose": _dedupe(prose)}


def _dedupe(docs: list[tuple[str, bool]]) -> tuple[tuple[str, bool], ...]:
    """Drop repeated texts (e.g. identical small modules) so no text sits in both splits."""
    seen: set[str] = set()
    out: list[tuple[str, bool]] = []
    for text, heldout in docs:
        if text not in seen:
            seen.add(text)
            out.append((text, heldout))
    return tuple(out)


def _select(domain: str, split: str) -> list[str]:
    docs = _scan()[domain]
    if split == "all":
        return [text for text, _ in docs]
    want_heldout = split == "heldout"
    return [text for text, heldout in docs if heldout == want_heldout]


def _interleave(a: list[str], b: list[str]) -> list[str]:
    """Spread the shorter list evenly through the longer one (deterministic)."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return list(a)
    out: list[str] = []
    step = len(a) / len(b)
    j = 0
    for i, doc in enumerate(a):
        out.append(doc)
        while j < len(b) and (j + 1) * step <= i + 1:
            out.append(b[j])
            j += 1
    out.extend(b[j:])
    return out


def builtin_documents(domain: str, split: str = "train") -> list[str]:
    """Documents of a built-in corpus.

    Args:
        domain: ``"code"``, ``"prose"`` or ``"mixed"`` (code and prose interleaved), or
            ``"third-party-code"`` / ``"third-party-prose"`` (dependencies' sources and docs; their
            ``train`` split is a disjoint calibration part, see :mod:`third_party_corpus`) or
            ``"third-party-mixed"`` (both interleaved, as ``"mixed"``), or ``"broad-mixed"``
            (``"third-party-mixed"`` and as many characters of ``"mixed"``, interleaved).
        split: ``"train"``, ``"heldout"`` or ``"all"``.

    Returns:
        A new list of document strings in a deterministic order.
    """
    if domain == BROAD_DOMAIN:  # as many characters of own text as of third-party text
        third, own, size = builtin_documents("third-party-mixed", split), [], 0
        budget = sum(len(d) for d in third)
        for doc in builtin_documents("mixed", split):
            if size >= budget:
                break
            own.append(doc)
            size += len(doc)
        return _interleave(own, third)
    if domain in THIRD_PARTY_DOMAINS:
        from moeprune.calibration.third_party_corpus import third_party_documents

        if domain == "third-party-mixed":
            return _interleave(third_party_documents("third-party-code", split),
                               third_party_documents("third-party-prose", split))
        return third_party_documents(domain, split)
    if domain not in DOMAINS:
        raise ValueError(
            f"unknown built-in corpus domain {domain!r}; expected one of {DOMAINS + THIRD_PARTY_DOMAINS + (BROAD_DOMAIN,)}"
        )
    if split not in SPLITS:
        raise ValueError(f"unknown built-in corpus split {split!r}; expected one of {SPLITS}")
    if domain == "mixed":
        return _interleave(_select("code", split), _select("prose", split))
    return _select(domain, split)
