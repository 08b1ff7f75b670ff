"""Held-out text nobody here trained on: code and documentation of moeprune's own dependencies.

The bundled models were trained on the Python standard library (:mod:`builtin_corpus`), so its
held-out split is still the training distribution. Every moeprune install also carries the
sources of its dependencies (transformers, torch, scipy, ...), written by other people in other
styles: a held-out set from outside the training distribution, available offline.

* ``third-party-code``: ``.py`` files of a fixed list of packages (tests, vendored code and
  anything textually equal to a stdlib corpus document excluded), each cut to at most
  ``MAX_DOC_CHARS`` at a line boundary.
* ``third-party-prose``: long docstrings of *other* files of the same packages (one document per
  file) and the long descriptions in the distributions' ``METADATA`` (their READMEs).

Selection is deterministic and as stable across installed versions as it can be: a file is keyed
by ``package/relative/path``; md5 of the key decides its role (code or prose source) and its split
(``heldout``: evaluation, ``train``: calibration, disjoint), and files are taken in md5 order,
one per package in turn, until a character budget is filled. A new version of a package changes
the text of a selected file but rarely which files are selected. :func:`third_party_manifest`
records the package versions and every selected document's key, length and content hash.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata as md
import importlib.util
from pathlib import Path

# Import names; all are (transitive) core dependencies of moeprune, so every install has them.
PACKAGES: tuple[str, ...] = (
    "transformers", "torch", "scipy", "sklearn", "datasets", "accelerate", "huggingface_hub",
    "pydantic", "click", "tqdm", "yaml", "safetensors", "tokenizers", "numpy", "pandas",
    "networkx", "sympy", "jinja2",
)
DISTRIBUTIONS: dict[str, str] = {"sklearn": "scikit-learn", "yaml": "PyYAML", "huggingface_hub": "huggingface-hub"}
DOMAINS: tuple[str, ...] = ("third-party-code", "third-party-prose")
# Characters per (domain, split); about 3-4 characters per token with the bundled tokenizer.
BUDGET_CHARS: dict[str, int] = {"heldout": 200_000, "train": 100_000}
MAX_DOC_CHARS = 3_000
MIN_DOC_CHARS = 400
_MIN_DOCSTRING_CHARS = 200
_EXCLUDED_PARTS = frozenset({"test", "tests", "testing", "_vendor", "vendor", "vendored", "__pycache__", "benchmarks"})


def _md5(text: str) -> int:
    return int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16)


def role_and_split(key: str) -> tuple[str, str]:
    """(``"code"`` or ``"prose"``, ``"heldout"`` or ``"train"``) of a ``package/path`` key."""
    h = _md5(key)
    return ("code" if h % 2 == 0 else "prose"), ("train" if (h // 2) % 3 == 0 else "heldout")


def _package_root(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _version(name: str) -> str | None:
    try:
        return md.version(DISTRIBUTIONS.get(name, name))
    except md.PackageNotFoundError:
        return None


def _cut(text: str, limit: int = MAX_DOC_CHARS) -> str:
    """At most ``limit`` characters, cut at the last line break before it."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    return head[: head.rfind("\n")] if "\n" in head else head


def _docstrings(source: str) -> str:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    docs = [ast.get_docstring(n) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return "\n\n".join(d for d in docs if d and len(d) > _MIN_DOCSTRING_CHARS)


def _metadata_description(name: str) -> str:
    try:
        meta = md.metadata(DISTRIBUTIONS.get(name, name))
    except md.PackageNotFoundError:
        return ""
    body = meta.get_payload() if hasattr(meta, "get_payload") else None  # type: ignore[attr-defined]
    return str(body or meta.get("Description") or "")


def _candidates(name: str, role: str, split: str) -> list[tuple[str, Path | None]]:
    """(key, path) of a package's files with this role and split, in md5 order (METADATA first)."""
    root = _package_root(name)
    if root is None:
        return []
    keys: list[tuple[str, Path | None]] = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _EXCLUDED_PARTS.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        key = f"{name}/{rel.as_posix()}"
        if role_and_split(key) == (role, split):
            keys.append((key, path))
    keys.sort(key=lambda kp: (_md5(kp[0]), kp[0]))
    if role == "prose" and role_and_split(f"{name}/METADATA")[1] == split:
        keys.insert(0, (f"{name}/METADATA", None))
    return keys


def _text(name: str, role: str, path: Path | None) -> str:
    if path is None:
        return _metadata_description(name)
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""
    return source if role == "code" else _docstrings(source)


@functools.lru_cache(maxsize=1)
def _stdlib_texts() -> frozenset[str]:
    from moeprune.calibration.builtin_corpus import builtin_documents

    return frozenset(builtin_documents("code", "all") + builtin_documents("prose", "all"))


@functools.lru_cache(maxsize=8)
def _select(domain: str, split: str, budget: int | None = None) -> tuple[tuple[str, str], ...]:
    """((key, text), ...) for one domain and split, filled round-robin over the packages up to
    ``budget`` characters (default ``BUDGET_CHARS[split]``); a larger budget selects a superset
    that starts with the smaller one's documents, in the same order."""
    role = domain.removeprefix("third-party-")
    budget = BUDGET_CHARS[split] if budget is None else budget
    stdlib = _stdlib_texts()
    queues = {name: iter(_candidates(name, role, split)) for name in PACKAGES}
    chosen: list[tuple[str, str]] = []
    seen: set[str] = set()
    total = 0
    while queues and total < budget:
        for name in list(queues):
            for key, path in queues[name]:
                raw = _text(name, role, path)
                if len(raw.strip()) < MIN_DOC_CHARS or raw in stdlib:
                    continue
                text = _cut(raw)
                if text in seen:
                    continue
                seen.add(text)
                chosen.append((key, text))
                total += len(text)
                break
            else:
                del queues[name]
            if total >= budget:
                break
    return tuple(chosen)


def third_party_documents(domain: str, split: str = "heldout") -> list[str]:
    """Documents of ``third-party-code`` or ``third-party-prose``.

    Args:
        domain: one of :data:`DOMAINS`.
        split: ``"heldout"`` (for evaluation), ``"train"`` (for calibration; disjoint from
            ``heldout``; no model here was trained on either) or ``"all"``.
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown third-party corpus {domain!r}; expected one of {DOMAINS}")
    if split not in ("heldout", "train", "all"):
        raise ValueError(f"unknown split {split!r}; expected 'heldout', 'train' or 'all'")
    splits = ("heldout", "train") if split == "all" else (split,)
    return [text for s in splits for _, text in _select(domain, s)]


def third_party_manifest() -> dict:
    """Package versions and, per domain and split, every selected document's key, size and md5."""
    return {
        "packages": {name: _version(name) for name in PACKAGES},
        "documents": {
            f"{domain}/{split}": [{"key": key, "chars": len(text), "md5": hashlib.md5(text.encode()).hexdigest()}
                                  for key, text in _select(domain, split)]
            for domain in DOMAINS for split in ("heldout", "train")
        },
    }
