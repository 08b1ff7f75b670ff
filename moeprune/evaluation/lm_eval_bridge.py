"""Optional bridge to EleutherAI's lm-evaluation-harness for in-memory (pruned) models.

``lm_eval`` is an optional extra (``pip install moeprune[eval]``); it is imported lazily and a
missing install raises an ImportError that says how to fix it. The bundled tasks read local JSONL
files, so they run offline: ``moeprune_python_mc`` (ten hand-written items) and the generated
``moeprune_next_line`` / ``moeprune_prose_continuation`` (:mod:`mc_tasks`, 500 items each, scored
natively by :mod:`mc_score` without lm-eval); other harness tasks work too when their datasets are
reachable.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from torch import nn

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LOCAL_TASK = "moeprune_python_mc"
BUNDLED_TASKS: tuple[str, ...] = (LOCAL_TASK, "moeprune_next_line", "moeprune_prose_continuation")
_PLACEHOLDER = "__DATA_FILE__"


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "lm-eval-harness is not installed; install it with `pip install lm-eval` "
            "or `pip install moeprune[eval]`"
        ) from exc
    return HFLM


def wrap_model(model: nn.Module, tokenizer: Any, batch_size: int = 1, max_length: int | None = None) -> Any:
    """An ``lm_eval`` ``HFLM`` around an already-loaded model and tokenizer."""
    HFLM = _require_lm_eval()
    device = str(next(model.parameters()).device)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device,
                max_length=max_length)


def local_task_dir(data_file: str | Path | None = None, workdir: str | Path | None = None) -> Path:
    """Write the bundled task YAMLs with absolute data paths (``data_file`` replaces
    ``moeprune_python_mc``'s); return their folder."""
    data = Path(data_file) if data_file else TASKS_DIR / f"{LOCAL_TASK}.jsonl"
    if not data.is_file():
        raise FileNotFoundError(f"task data file not found: {data}")
    out = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="moeprune-lm-eval-"))
    out.mkdir(parents=True, exist_ok=True)
    for task in BUNDLED_TASKS:
        task_data = data if task == LOCAL_TASK else TASKS_DIR / f"{task}.jsonl"
        if (TASKS_DIR / f"{task}.yaml").is_file() and task_data.is_file():
            text = (TASKS_DIR / f"{task}.yaml").read_text().replace(_PLACEHOLDER, str(task_data.resolve()))
            (out / f"{task}.yaml").write_text(text)
    return out


def run_lm_eval(
    model: nn.Module,
    tokenizer: Any,
    tasks: list[str] | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    data_file: str | Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Run harness tasks (default: the offline ``moeprune_python_mc``); returns per-task metrics."""
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = tasks or [LOCAL_TASK]
    include = str(local_task_dir(data_file)) if set(BUNDLED_TASKS) & set(tasks) else None
    manager = TaskManager(include_path=include) if include else TaskManager()
    results = simple_evaluate(
        model=wrap_model(model, tokenizer, batch_size=batch_size),
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        log_samples=False,
    )
    return results["results"]
