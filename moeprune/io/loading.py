"""Resolve a model argument to a loaded (model, tokenizer) pair.

`builtin:tiny-moe` (the default) is the small MoE trained by `scripts/train_tiny_moe.py` and shipped
in `moeprune/assets/tiny-moe`; if a checkout lacks it, a tiny random Qwen3-MoE is built locally
under the user cache so the pipeline still runs offline. Local directories load with
`moeprune.load_pruned` (stock or non-uniform moeprune outputs). Any other string is handed to
transformers as a hub id: that code path is real, but the hub may be unreachable.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from moeprune.adapters import find_moe_layers

logger = logging.getLogger(__name__)

BUNDLED = "builtin:tiny-moe"
RANDOM_TINY = "builtin:random-tiny"
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-moe"


def bundled_model_path() -> Path | None:
    """The shipped trained model's directory, if this install has it."""
    return ASSET_DIR if (ASSET_DIR / "config.json").is_file() else None


def _random_tiny_path() -> Path:
    from moeprune.testing.tiny_models import save_tiny_checkpoint

    cache = Path(os.environ.get("MOEPRUNE_CACHE", Path.home() / ".cache" / "moeprune")) / "random-tiny-qwen3-moe"
    if not (cache / "config.json").is_file():
        tmp = cache.with_name(cache.name + f".partial-{os.getpid()}")
        save_tiny_checkpoint("qwen3_moe", tmp)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, cache)
    return cache


def resolve_model_path(spec: str) -> str:
    """Local directory (or hub id) for a model argument."""
    if spec == BUNDLED:
        path = bundled_model_path()
        if path is None:
            logger.warning("bundled trained model not found; using a tiny random Qwen3-MoE instead")
            return str(_random_tiny_path())
        return str(path)
    if spec == RANDOM_TINY:
        return str(_random_tiny_path())
    return spec


def load_model(spec: str = BUNDLED, dtype: torch.dtype = torch.float32, check_moe: bool = True) -> tuple[Any, Any, str]:
    """(model, tokenizer or None, resolved path). Raises NotAnMoEModelError for dense models."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moeprune.io.checkpoint import load_pruned

    path = resolve_model_path(spec)
    local = Path(path)
    if local.exists():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"{local} is not a Hugging Face checkpoint directory (no config.json)")
        model = load_pruned(local, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    if check_moe:
        find_moe_layers(model)
    return model, tokenizer, path
