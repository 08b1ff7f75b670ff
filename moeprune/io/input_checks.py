"""Checks of inputs made before any work starts: calibration sources, sequence length, model config.

Each failure is one line naming what is wrong and the fix; a sequence length beyond the model's
`max_position_embeddings` is a warning (the model can run it, but its positions were never trained).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from moeprune.io.loading import looks_like_local_path

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")


def check_text_source(source: str) -> None:
    """A calibration/evaluation source that names a local file must exist (never a hub lookup)."""
    if source.startswith(("builtin:", "hf:")):
        return
    path = Path(source).expanduser()
    if path.exists():
        return
    if looks_like_local_path(source) or path.suffix in TEXT_SUFFIXES:
        raise FileNotFoundError(
            f"calibration source {source} does not exist; give an existing .txt/.jsonl file or directory, "
            "builtin:code|prose|mixed, or hf:NAME for a Hugging Face dataset"
        )


def read_config(path: str | Path) -> dict[str, Any]:
    """config.json of a local checkpoint as a dict, with a one-line error when it is not valid JSON."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); fix or restore the checkpoint's config") from err
    if not isinstance(data, dict):
        raise ValueError(f"{file} is not a JSON object; fix or restore the checkpoint's config")
    return data


def check_seq_len(config: Any, seq_len: int) -> bool:
    """Warn (and return False) when `seq_len` exceeds the model's max_position_embeddings."""
    if isinstance(config, dict):
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
        limit = text.get("max_position_embeddings", config.get("max_position_embeddings"))
    else:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        limit = getattr(text, "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        logger.warning("--seq-len %d exceeds the model's max_position_embeddings (%d): calibration runs on positions "
                       "the model was never trained on; lower --seq-len to %d or less", seq_len, limit, limit)
        return False
    return True
