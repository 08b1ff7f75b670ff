"""Multiple-choice tasks generated deterministically from held-out text, scored by log-likelihood.

Pruning papers report downstream accuracy (and retention: pruned accuracy / dense accuracy); the
harness tasks they use need the network and are far beyond a 22M-parameter model. These tasks are
built offline from the third-party held-out text (:mod:`moeprune.calibration.third_party_corpus`),
which no bundled model was trained on, so the answer is never memorised:

* ``moeprune_next_line``: the true next line of a Python file after up to ``CONTEXT_LINES`` lines,
  among three lines with the same indentation from three other files (a 22M-parameter model is
  near chance when the distractors come from the same file).
* ``moeprune_prose_continuation``: the true end of a documentation sentence (after the preceding
  sentence and the first half of its words), among the ends of three sentences with a similar
  number of words from three other documents.

Every item has ``NUM_CHOICES`` choices, so chance accuracy is exactly ``1 / NUM_CHOICES``. The
headline metric is ``acc_mutual_info`` (lm-eval's; :mod:`mc_score`): plain summed log-likelihood
(``acc``) leaves the bundled models at chance because it prefers short, common lines. Items
are ``{"context", "choices", "label", "source"}``; choices carry their own separator (a newline or
a space), so lm-eval's ``target_delimiter`` is empty and contexts never end in whitespace. The
label's position is drawn from the seeded generator. Same documents and seed, same items.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

NUM_CHOICES = 4
CHANCE = 1.0 / NUM_CHOICES
CONTEXT_LINES = 6
MAX_CONTEXT_CHARS = 320
MAX_CHOICE_CHARS = 120
MAX_ITEMS_PER_DOC = 12
N_ITEMS = 500
TASKS: dict[str, str] = {"moeprune_next_line": "third-party-code", "moeprune_prose_continuation": "third-party-prose"}
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WORDY = re.compile(r"[A-Za-z]{2,}")


def _rng(name: str, seed: int) -> random.Random:
    return random.Random(int(hashlib.md5(f"{name}:{seed}".encode()).hexdigest(), 16))


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _useful_line(line: str) -> bool:
    s = line.strip()
    return 12 <= len(s) <= MAX_CHOICE_CHARS and not s.startswith("#") and len(_WORDY.findall(s)) >= 2


def _item(context: str, answer: str, distractors: list[str], rng: random.Random, source: str) -> dict[str, Any]:
    label = rng.randrange(NUM_CHOICES)
    choices = list(distractors)
    choices.insert(label, answer)
    return {"context": context, "choices": choices, "label": label, "source": source}


def _code_pool(docs: list[str]) -> list[dict[str, list[str]]]:
    """Per document, its useful lines by indentation (the distractor pool)."""
    pools = []
    for doc in docs:
        by_indent: dict[str, list[str]] = {}
        for line in doc.split("\n"):
            if _useful_line(line):
                by_indent.setdefault(_indent(line), []).append(line.rstrip())
        pools.append(by_indent)
    return pools


def _other_docs(n_docs: int, own: int, rng: random.Random) -> list[int]:
    order = [d for d in range(n_docs) if d != own]
    rng.shuffle(order)
    return order


def next_line_items(docs: list[str], d: int, rng: random.Random, pools: list, source: str = "") -> list[dict[str, Any]]:
    """Items of code document ``d``: context = up to CONTEXT_LINES previous lines; distractors =
    lines with the same indentation from other documents (one per document)."""
    lines = docs[d].split("\n")
    useful = [i for i, line in enumerate(lines) if _useful_line(line)]
    targets = [i for i in useful if i >= 2]
    rng.shuffle(targets)
    items: list[dict[str, Any]] = []
    for i in targets:
        if len(items) >= MAX_ITEMS_PER_DOC:
            break
        raw = "\n".join(lines[max(0, i - CONTEXT_LINES) : i])
        context = raw.rstrip()
        sep = raw[len(context):] + "\n"  # blank lines between context and answer stay in the choices
        context = context[-MAX_CONTEXT_CHARS:].lstrip("\n")
        if len(context.strip()) < 20:
            continue
        answer = lines[i].rstrip()
        seen = {line.strip() for line in lines}
        distractors: list[str] = []
        for other in _other_docs(len(docs), d, rng):
            cands = [c for c in pools[other].get(_indent(answer), []) if c.strip() not in seen]
            if cands:
                pick = rng.choice(cands)
                seen.add(pick.strip())
                distractors.append(pick)
            if len(distractors) == NUM_CHOICES - 1:
                break
        if len(distractors) < NUM_CHOICES - 1:
            continue
        items.append(_item(context, sep + answer, [sep + d for d in distractors], rng, source))
    return items


def _sentences(doc: str) -> list[str]:
    out: list[str] = []
    for para in re.split(r"\n\s*\n", doc):
        text = " ".join(para.split())
        if ">>>" in text or not text:
            continue
        out.extend(s for s in _SENTENCE_END.split(text))
    return out


def _prose_sentence(s: str) -> bool:
    words = s.split()
    plain = sum(ch.isalpha() or ch in " ,.;:'-()" for ch in s) / max(1, len(s))
    return (8 <= len(words) <= 40 and len(s) <= 2 * MAX_CHOICE_CHARS and plain >= 0.9
            and "http" not in s and len(_WORDY.findall(s)) >= 0.6 * len(words))


def _prose_pool(docs: list[str]) -> list[list[str]]:
    return [[s for s in _sentences(doc) if _prose_sentence(s)] for doc in docs]


def prose_continuation_items(docs: list[str], d: int, rng: random.Random, pools: list, source: str = "") -> list[dict[str, Any]]:
    """Items of prose document ``d``: context = previous sentence + first half of a sentence;
    distractors = second halves of sentences of similar length from other documents."""
    sents = _sentences(docs[d])
    ok = [i for i, s in enumerate(sents) if _prose_sentence(s)]
    targets = [i for i in ok if i >= 1]
    rng.shuffle(targets)
    items: list[dict[str, Any]] = []
    for i in targets:
        if len(items) >= MAX_ITEMS_PER_DOC:
            break
        words = sents[i].split()
        cut = len(words) // 2
        context = (sents[i - 1] + " " + " ".join(words[:cut]))[-MAX_CONTEXT_CHARS:]
        answer = " " + " ".join(words[cut:])
        seen = {answer}
        distractors: list[str] = []
        for other in _other_docs(len(docs), d, rng):
            cands = [s.split() for s in pools[other] if abs(len(s.split()) - len(words)) <= max(3, len(words) // 3)]
            tails = [" " + " ".join(w[len(w) // 2 :]) for w in cands]
            tails = [t for t in tails if t not in seen]
            if tails:
                pick = rng.choice(tails)
                seen.add(pick)
                distractors.append(pick)
            if len(distractors) == NUM_CHOICES - 1:
                break
        if len(distractors) < NUM_CHOICES - 1:
            continue
        items.append(_item(context.lstrip(), answer, distractors, rng, source))
    return items


_GENERATORS = {"moeprune_next_line": (next_line_items, _code_pool),
               "moeprune_prose_continuation": (prose_continuation_items, _prose_pool)}


def generate_task(name: str, docs: list[str] | None = None, n_items: int = N_ITEMS, seed: int = 0,
                  keys: list[str] | None = None, budget_chars: int | None = None) -> list[dict[str, Any]]:
    """``n_items`` items of task ``name`` from ``docs`` (default: its held-out third-party domain,
    ``budget_chars`` characters of it; default the held-out set's own budget, which yields about
    880 next-line and 700 prose items: a larger budget adds documents nobody trained on either).

    Items are drawn round-robin over documents (their order within a document is shuffled by the
    seeded generator), so every document contributes before any contributes twice.
    """
    if name not in _GENERATORS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(_GENERATORS)}")
    if docs is not None and budget_chars is not None:
        raise ValueError("budget_chars selects the default documents; it cannot be combined with docs")
    if docs is None:
        from moeprune.calibration.third_party_corpus import _select

        selected = _select(TASKS[name], "heldout", budget_chars)
        keys, docs = [k for k, _ in selected], [t for _, t in selected]
    keys = keys or [f"doc{i}" for i in range(len(docs))]
    rng = _rng(name, seed)
    make, pool_of = _GENERATORS[name]
    pools = pool_of(docs)
    per_doc = [make(docs, d, rng, pools, key) for d, key in enumerate(keys)]
    items: list[dict[str, Any]] = []
    depth = 0
    while len(items) < n_items and any(depth < len(p) for p in per_doc):
        items.extend(p[depth] for p in per_doc if depth < len(p))
        depth += 1
    if len(items) < n_items:
        raise ValueError(f"task {name}: only {len(items)} items from {len(docs)} documents; need {n_items}")
    return items[:n_items]


def write_task(name: str, items: list[dict[str, Any]], folder: Path = TASKS_DIR) -> Path:
    """Write ``<name>.jsonl`` and its lm-eval ``<name>.yaml`` (data path filled in at run time)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    (folder / f"{name}.yaml").write_text(
        f"# Offline multiple-choice task generated by moeprune.evaluation.mc_tasks (chance {CHANCE:g}).\n"
        "# `data_files` is filled with an absolute path by moeprune.evaluation.lm_eval_bridge.\n"
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: __DATA_FILE__\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: context\n"
        "doc_to_choice: choices\ndoc_to_target: label\ntarget_delimiter: \"\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_mutual_info\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n"
    )
    return path


def load_task(name: str, folder: Path = TASKS_DIR) -> list[dict[str, Any]]:
    """Items of a shipped (or written) task."""
    path = folder / f"{name}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} not found; generate it with python -m moeprune.evaluation.mc_tasks")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main() -> None:
    """Regenerate the shipped task files and the manifest of the text they were made from."""
    from moeprune.calibration.third_party_corpus import third_party_manifest

    for name in TASKS:
        print(f"{write_task(name, generate_task(name))}: {N_ITEMS} items")
    (TASKS_DIR / "third_party_manifest.json").write_text(json.dumps(third_party_manifest(), indent=1) + "\n")


if __name__ == "__main__":
    main()
