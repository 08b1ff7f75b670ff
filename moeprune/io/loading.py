"""Resolve a model argument to a loaded (model, tokenizer) pair.

`builtin:tiny-moe` (the default) is the small MoE trained by `scripts/train_tiny_moe.py` and shipped
in `moeprune/assets/tiny-moe`; if a checkout lacks it, a tiny random Qwen3-MoE is built locally
under the user cache so the pipeline still runs offline. Local directories load with
`moeprune.load_pruned` (stock or non-uniform moeprune outputs). A string that looks like a path
(absolute, `./`, `~`, several `/`, or whose parent exists) and does not exist is an error, never
a hub lookup; any other string is handed to transformers as a hub id (the hub may be unreachable).

Models load in the checkpoint's own dtype by default (`dtype="auto"`: bf16 in, bf16 in memory and
out); `--dtype` overrides it. Repository code is never run unless `--trust-remote-code` opts in:
every transformers loader gets `trust_remote_code=` explicitly, so none of them ever prompts.
A pickle (`.bin`) checkpoint is refused (unpickling can run code; convert it to safetensors), and
the safetensors headers are checked before loading so a truncated shard is a one-line error.
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
# Fine-grained sibling (64 experts, top-8; same tokenizer): `builtin:tiny-moe-64`.
BUNDLED_64 = "builtin:tiny-moe-64"
ASSET_DIR_64 = ASSET_DIR.with_name("tiny-moe-64")


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
    if spec == BUNDLED_64:
        if not (ASSET_DIR_64 / "config.json").is_file():
            raise FileNotFoundError(f"{BUNDLED_64} is not in this install ({ASSET_DIR_64} has no config.json)")
        return str(ASSET_DIR_64)
    return spec


DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
_TRUST_REMOTE_CODE = False


def set_trust_remote_code(value: bool) -> None:
    """Process-wide opt-in to running checkpoint code (`--trust-remote-code`); off by default."""
    global _TRUST_REMOTE_CODE
    _TRUST_REMOTE_CODE = bool(value)


def trust_remote_code() -> bool:
    """What every `from_pretrained` / `AutoConfig` / `AutoTokenizer` call passes as `trust_remote_code`."""
    return _TRUST_REMOTE_CODE


def looks_like_local_path(spec: str) -> bool:
    """True for strings meant as local paths (never to be looked up on the hub)."""
    if spec.startswith(("/", "./", "../", "~", ".")) or spec.endswith("/") or spec.count("/") > 1 or "\\" in spec:
        return True
    parent = Path(spec).expanduser().parent
    return str(parent) not in ("", ".") and parent.exists()


def _config_json(path: str | Path) -> dict:
    """A checkpoint's config.json as a dict, with one-line errors for invalid JSON."""
    import json

    file = Path(path) / "config.json"
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON ({err}); fix or restore the checkpoint's config") from err
    if not isinstance(data, dict):
        raise ValueError(f"{file} is not a JSON object; fix or restore the checkpoint's config")
    return data


def checkpoint_dtype(path: str | Path) -> torch.dtype:
    """The checkpoint's own dtype: the one most of its floating-point weights are stored in (shard
    headers), else what config.json declares (`dtype` / `torch_dtype`), float32 if none. The two
    differ when a model keeps its first tensors in float32 (Ergo's embeddings and norms): the
    config then says float32 for a bfloat16 checkpoint."""
    from moeprune.io.safetensors_io import CorruptCheckpointError, stored_float_dtype

    data = _config_json(path)
    try:
        stored = stored_float_dtype(path)
    except CorruptCheckpointError:
        stored = None  # reported by whatever reads the shards next
    if stored is not None:
        return stored
    text = data.get("text_config") if isinstance(data.get("text_config"), dict) else {}
    name = data.get("dtype") or data.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype") or "float32"
    value = getattr(torch, str(name), None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, path: str | Path | None = None) -> torch.dtype:
    """`auto` (or None) -> the checkpoint's dtype; a name or torch.dtype -> itself."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if path is not None and (Path(path) / "config.json").is_file():
            return checkpoint_dtype(path)
        return torch.float32
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    return getattr(torch, dtype)


def check_causal_lm(config: Any, path: str | Path) -> None:
    """One line when transformers has no causal-LM class for the checkpoint's model type (a
    multimodal model such as qwen3_vl_moe, an encoder-decoder such as switch_transformers):
    moeprune loads causal LMs, and multimodal models with an image-text-to-text class (their text
    model pruned). Remote-code configs that map AutoModelForCausalLM pass."""
    from moeprune.io.auto_class import NOT_AUTOREGRESSIVE, text_model_class

    model_type = getattr(config, "model_type", None)
    if text_model_class(config) is not None:
        return
    kind = "an encoder-decoder model" if getattr(config, "is_encoder_decoder", False) else "not a causal LM"
    kind = NOT_AUTOREGRESSIVE.get(model_type, kind)
    raise ValueError(f"{path}: {model_type} is {kind} (transformers has no causal-LM class for it); moeprune "
                     "prunes decoder-only causal LMs (and image-text-to-text models); this kind is not supported yet")


def check_local_checkpoint(path: Path) -> None:
    """One-line errors for a local directory that is not a loadable safetensors checkpoint."""
    from moeprune.io.safetensors_io import open_shard, shard_map

    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; give a Hugging Face checkpoint directory")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
    _config_json(path)  # invalid JSON -> one line
    from transformers import AutoConfig

    try:  # an unknown model_type with auto_map fails here, without a prompt, unless --trust-remote-code
        config = AutoConfig.from_pretrained(path, trust_remote_code=_TRUST_REMOTE_CODE)
    except (ValueError, KeyError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = " (pass --trust-remote-code only if you trust its code)" if "auto_map" in (path / "config.json").read_text() else ""
        raise ValueError(f"{path}: cannot read its config: {first}{hint}") from err
    check_causal_lm(config, path)
    has_safetensors = any(path.glob("*.safetensors"))
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles and not has_safetensors:
        raise ValueError(f"{path} holds a pickle checkpoint ({pickles[0]}); moeprune reads only safetensors "
                         "(unpickling can run code): convert it first, e.g. save_pretrained(..., safe_serialization=True)")
    for shard in sorted(set(shard_map(path).values())):
        with open_shard(shard):  # header and size checked: a truncated shard fails here, in one line
            pass


def load_model(
    spec: str = BUNDLED, dtype: str | torch.dtype | None = "auto", check_moe: bool = True,
    trust_remote_code: bool | None = None, device: str | torch.device | None = None,
) -> tuple[Any, Any, str]:
    """(model, tokenizer or None, resolved path). Raises NotAnMoEModelError for dense models.

    `dtype="auto"` loads in the checkpoint's own dtype; `trust_remote_code=None` means the
    process-wide setting (`set_trust_remote_code`, off by default). `device="auto"` with two or
    more visible GPUs loads the model spread over them (`devices.device_map_for`); otherwise the
    model loads on the CPU and the caller moves it (`devices.move_model`, a no-op when spread)."""
    from transformers import AutoTokenizer

    from moeprune.devices import device_map_for
    from moeprune.io.checkpoint import load_pruned

    device_map = device_map_for(device) if device is not None else None
    spread = {"device_map": device_map} if device_map else {}
    remote = _TRUST_REMOTE_CODE if trust_remote_code is None else bool(trust_remote_code)
    path = resolve_model_path(spec)
    local = Path(path).expanduser()
    if local.exists():
        check_local_checkpoint(local)
        model = load_pruned(local, dtype=resolve_dtype(dtype, local), trust_remote_code=remote, **spread)
    elif looks_like_local_path(path):
        raise FileNotFoundError(f"model path {path} does not exist; give an existing checkpoint directory")
    else:
        try:
            from transformers import AutoConfig

            from moeprune.io.auto_class import auto_model_class

            config = AutoConfig.from_pretrained(path, trust_remote_code=remote)
            check_causal_lm(config, path)
            model = auto_model_class(config).from_pretrained(
                path, dtype=resolve_dtype(dtype) if dtype != "auto" else "auto", trust_remote_code=remote, **spread).eval()
        except OSError as err:
            raise FileNotFoundError(f"{path} is neither a local directory nor a reachable hub model ({str(err).splitlines()[0]})") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    if check_moe:
        find_moe_layers(model)
    return model, tokenizer, path
