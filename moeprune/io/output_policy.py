"""The one output policy every moeprune writer follows: lose nothing, leave nothing half-written.

Every path moeprune writes (pruned checkpoints in memory or streamed, statistics files, plan files,
work directories) goes through `check_output` before any work starts:

* an output that is, contains, or lies inside an input is refused;
* the nearest existing ancestor of the output must be a writable directory (missing parents are
  created);
* a previous output that a killed run had moved aside (`.{name}.old-*`) is put back first;
* an existing output is replaced only when it is a previous moeprune output of the same kind
  (a checkpoint directory with `moeprune_complete.json` or `moeprune_plan.json`, a statistics
  file with moeprune's safetensors header, a plan JSON) and `overwrite` is set; anything else is
  refused, whatever `overwrite` says: moeprune never deletes what it did not write.

Work directories carry `moeprune_workdir.json`; a non-empty directory without it is foreign and
refused. Temporaries are named `.{name}.partial-XXXXXXXX` / `.{name}.old-XXXXXXXX` next to the
output; `clean_stale` removes leftovers of killed runs (they match that exact pattern).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Literal

logger = logging.getLogger(__name__)

Kind = Literal["checkpoint", "stats", "plan", "workdir"]
COMPLETE_MARKER = "moeprune_complete.json"
PLAN_FILE = "moeprune_plan.json"
WORKDIR_MARKER = "moeprune_workdir.json"
CHECKPOINT_MARKERS = (COMPLETE_MARKER, PLAN_FILE)


class OutputPathError(ValueError):
    """The output path is unusable (overlaps an input, foreign content, unwritable parent, exists)."""


def _resolve(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _overlap(out: Path, inputs: Iterable[str | Path | None], what: str) -> None:
    for raw in inputs:
        if not raw:
            continue
        src = Path(raw).expanduser()
        if not src.exists():
            continue
        src = src.resolve()
        if out == src or src in out.parents:
            raise OutputPathError(f"{what} {out} is the input {src} or inside it; choose a path outside the input")
        if out in src.parents:
            raise OutputPathError(f"{what} {out} contains the input {src}; choose a path that does not contain the input")


def _check_parent(out: Path, what: str) -> None:
    ancestor = out.parent
    while not ancestor.exists():
        if ancestor.is_symlink():
            raise OutputPathError(f"{what} {out}: {ancestor} is a broken link; fix it or choose another path")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"{what} {out}: {ancestor} is a file, not a directory; choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {out}: directory {ancestor} is not writable; choose another path")


def is_moeprune_checkpoint(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in CHECKPOINT_MARKERS)


def _is_moeprune_file(path: Path, kind: Kind) -> bool:
    try:
        if kind == "stats":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                return (handle.metadata() or {}).get("format") == "moeprune-stats"
        data = json.loads(path.read_text())
        return isinstance(data, dict) and data.get("format") == "moeprune-plan"
    except Exception:  # unreadable: not ours
        return False


def check_output(
    path: str | Path, inputs: Iterable[str | Path | None] = (), kind: Kind = "checkpoint", overwrite: bool = False,
) -> Path:
    """Validate output `path` (see the module docstring); returns it resolved. Nothing is written."""
    what = {"checkpoint": "output", "stats": "statistics file", "plan": "plan file", "workdir": "work directory"}[kind]
    out = _resolve(path)
    _overlap(out, inputs, what)
    _check_parent(out, what)
    if kind == "checkpoint":
        restore_previous(out)
    if not out.exists():
        if out.is_symlink():
            raise OutputPathError(f"{what} {out} is a broken link; remove it or choose another path")
        return out
    if kind in ("checkpoint", "workdir"):
        if not out.is_dir():
            raise OutputPathError(f"{what} {out} exists and is a file, not a directory; choose another path")
        if not any(out.iterdir()):
            return out
        if kind == "workdir":
            if not (out / WORKDIR_MARKER).is_file():
                raise OutputPathError(f"{what} {out} is not empty and was not made by moeprune (no {WORKDIR_MARKER}); "
                                      "moeprune never deletes what it did not write: choose an empty or new directory")
            return out
        if not is_moeprune_checkpoint(out):
            raise OutputPathError(f"output {out} exists, is not empty and is not a moeprune output; moeprune never "
                                  "deletes what it did not write: choose another path (or empty it yourself)")
        if not overwrite:
            raise OutputPathError(f"output {out} exists and is not empty (a previous moeprune output); "
                                  "pass --overwrite (overwrite=True) to replace it")
        return out
    if out.is_dir():
        raise OutputPathError(f"{what} {out} is a directory; give a file name")
    if not _is_moeprune_file(out, kind):
        raise OutputPathError(f"{what} {out} exists and is not a moeprune {kind} file; moeprune never replaces "
                              "what it did not write: choose another path")
    if not overwrite:
        raise OutputPathError(f"{what} {out} exists; pass --overwrite to replace it")
    return out


def temp_sibling(out: Path, tag: str = "partial") -> Path:
    return out.parent / f".{out.name}.{tag}-{uuid.uuid4().hex[:8]}"


def _stale_pattern(out: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(out.name)}\.(partial|old)-[0-9a-f]{{8}}$")


def restore_previous(out: Path) -> bool:
    """A run killed while publishing may have moved the previous output aside (`.{name}.old-*`)
    before renaming the new one into place; when `out` is missing, put the previous one back."""
    if out.exists() or not out.parent.is_dir():
        return False
    pattern = _stale_pattern(out)
    olds = [e for e in out.parent.iterdir() if pattern.match(e.name) and ".old-" in e.name and is_moeprune_checkpoint(e)]
    if not olds:
        return False
    os.replace(max(olds, key=lambda e: e.stat().st_mtime), out)
    logger.warning("restored the previous output %s (an earlier run was killed while replacing it)", out)
    return True


def clean_stale(out: str | Path) -> list[Path]:
    """Remove `.{name}.partial-*` / `.{name}.old-*` leftovers of earlier (killed) runs next to `out`.

    Call `restore_previous` first (`check_output` does) so a previous output moved aside by a
    killed publish is put back rather than removed."""
    out = _resolve(out)
    if not out.parent.is_dir():
        return []
    pattern = _stale_pattern(out)
    removed = []
    for entry in out.parent.iterdir():
        if pattern.match(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    for leftover in (out.with_name(out.name + ".partial"), out.with_name(out.name + ".tmp")):
        if leftover.is_file():
            leftover.unlink()
            removed.append(leftover)
    if removed:
        logger.info("removed %d leftover temporaries of earlier runs next to %s", len(removed), out)
    return removed


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def publish_directory(tmp: Path, out: Path) -> None:
    """Move a fully written `tmp` directory to `out` by rename, replacing a previous moeprune output."""
    if out.exists():
        if any(out.iterdir()) and not is_moeprune_checkpoint(out):  # re-checked: never delete foreign content
            raise OutputPathError(f"output {out} is not a moeprune output; refusing to replace it")
        trash = temp_sibling(out, "old")
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def prepare_work_dir(path: str | Path, inputs: Iterable[str | Path | None] = (), outputs: Iterable[str | Path | None] = ()) -> Path:
    """Validate and create a work directory: not overlapping inputs or outputs, empty or moeprune's."""
    work = check_output(path, [*inputs, *outputs], kind="workdir")
    work.mkdir(parents=True, exist_ok=True)
    marker = work / WORKDIR_MARKER
    if not marker.is_file():
        marker.write_text(json.dumps({"format": "moeprune-workdir"}) + "\n")
    return work


def remove_work_dir(path: str | Path) -> None:
    """Delete a finished work directory, only if moeprune made it."""
    work = Path(path)
    if (work / WORKDIR_MARKER).is_file():
        shutil.rmtree(work, ignore_errors=True)
