"""Save pruned models atomically and load them back, stock or non-uniform.

`save_pruned` writes into a temporary sibling directory and renames it into place only when every
file is written, so an interrupted run leaves nothing that looks like a finished checkpoint; it
refuses to write into (or inside) the input checkpoint. Uniform plans are saved in the original hub
layout and reload with plain `AutoModelForCausalLM.from_pretrained`. Non-uniform plans (different
expert counts per layer, which stock classes cannot express) are saved in the in-memory layout with
the config key `moeprune_experts_per_layer` and the global count set to the largest layer; stock
`from_pretrained` then fails loudly on the size mismatch, and `load_pruned` rebuilds them exactly.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from moeprune.adapters.layout import EXPERT_COUNT_ATTRS
from moeprune.io.safetensors_io import dominant_dtype
from moeprune.io.output_policy import (  # noqa: F401  (re-exported: OutputPathError, publish_directory)
    COMPLETE_MARKER,
    OutputPathError,
    check_output,
    clean_stale,
    publish_directory,
    temp_sibling,
)

logger = logging.getLogger(__name__)

PLAN_FILE = "moeprune_plan.json"  # == output_policy.PLAN_FILE
RECIPE_FILE = "moeprune_recipe.yaml"
PER_LAYER_KEY = "moeprune_experts_per_layer"
LAYER_WIDTH_KEY = "moeprune_intermediate_per_layer"  # moeprune.slimming.channels


def check_output_dir(output_dir: str | Path, input_dir: str | Path | None, overwrite: bool = False) -> Path:
    """The output policy (`output_policy.check_output`) for a checkpoint directory."""
    return check_output(output_dir, [input_dir], kind="checkpoint", overwrite=overwrite)


def _patch_config_json(path: Path, model: nn.Module) -> None:
    """Write every expert-count key the config knows (G8: Qwen3-MoE serialises only one), and the
    dtype most of the weights are in: transformers writes its first parameter's, which is float32
    in a bfloat16 model that keeps its embeddings in float32 (Ergo), so `dtype="auto"` would reload
    the output in float32."""
    data = json.loads(path.read_text())
    config = model.config
    for key in EXPERT_COUNT_ATTRS:
        value = getattr(config, key, None)
        if isinstance(value, int):
            data[key] = value
    counts: dict[torch.dtype, int] = {}
    for param in model.parameters():
        if param.is_floating_point():
            counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
    if (dominant := dominant_dtype(counts)) is not None:
        data["torch_dtype" if "torch_dtype" in data and "dtype" not in data else "dtype"] = \
            str(dominant).removeprefix("torch.")
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def save_pruned(
    model: nn.Module,
    output_dir: str | Path,
    plan: Any = None,
    tokenizer: Any = None,
    recipe: dict | None = None,
    input_dir: str | Path | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Atomically write `model` (+ tokenizer, plan, recipe) as a Hugging Face checkpoint."""
    input_dir = input_dir or getattr(model, "name_or_path", None) or None
    out = check_output_dir(output_dir, input_dir, overwrite)
    clean_stale(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)
    non_uniform = hasattr(model.config, PER_LAYER_KEY) or hasattr(model.config, LAYER_WIDTH_KEY)
    try:
        model.save_pretrained(tmp, max_shard_size=max_shard_size, save_original_format=not non_uniform)
        _patch_config_json(tmp / "config.json", model)
        if getattr(model.config, "moeprune_novices", None):  # MoNE extension tensors
            from moeprune.apply.novice import save_novices

            save_novices(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if plan is not None:
            plan.save(tmp / PLAN_FILE)
        if recipe is not None:
            (tmp / RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False))
        (tmp / COMPLETE_MARKER).write_text(json.dumps(_marker(model, input_dir, plan), indent=1))
        publish_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s", out)
    return out


def _marker(model: nn.Module, input_dir: str | Path | None, plan: Any) -> dict[str, Any]:
    """What `moeprune_complete.json` says about an in-memory output."""
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    marker: dict[str, Any] = {"source": str(Path(input_dir).resolve()) if input_dir else None, "dtype": dtypes}
    if plan is not None:
        marker.update(uniform=plan.uniform, experts_per_layer={str(k): v for k, v in plan.experts_per_layer.items()})
    return marker


def load_pruned(path: str | Path, dtype: str | torch.dtype | None = "auto", **kwargs: Any) -> nn.Module:
    """Load a moeprune output (or any local checkpoint): stock path for uniform checkpoints,
    exact rebuild for non-uniform ones; extensions (e.g. novices) are restored by their modules.

    `dtype="auto"` keeps the checkpoint's dtype; repository code runs only with
    `trust_remote_code=True` (default: the process-wide `loading.trust_remote_code()`, off).
    `device_map="auto"` spreads the model over the visible GPUs: stock checkpoints through
    `from_pretrained(device_map=...)`, the others (non-uniform, novices, dynamic skipping) are
    built on the CPU and then dispatched (`_dispatch`), so their extensions are in place first."""
    from transformers import AutoConfig

    from moeprune.io.auto_class import auto_model_class

    from moeprune.io.loading import resolve_dtype, trust_remote_code

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
    dtype = resolve_dtype(dtype, path)
    kwargs.setdefault("trust_remote_code", trust_remote_code())
    config = AutoConfig.from_pretrained(path, trust_remote_code=kwargs["trust_remote_code"])
    non_uniform = getattr(config, PER_LAYER_KEY, None) or getattr(config, LAYER_WIDTH_KEY, None)
    device_map = kwargs.pop("device_map", None)
    if device_map is not None and not (non_uniform or getattr(config, "moeprune_novices", None)
                                       or getattr(config, "moeprune_dynamic_skip", None)):
        kwargs["device_map"] = device_map  # stock: weights go straight to their GPUs
        device_map = None
    if non_uniform:
        model = _load_non_uniform(path, config, dtype, kwargs["trust_remote_code"])
    else:
        if getattr(config, "moeprune_novices", None):
            # novice layers keep E router rows for P experts: stock loading refuses them on purpose;
            # the mismatched routers are replaced by `restore_novices` below
            kwargs.setdefault("ignore_mismatched_sizes", True)
            model = _quietly(lambda: auto_model_class(config).from_pretrained(path, dtype=dtype, **kwargs))
        else:
            model = None
            if "device_map" not in kwargs and not kwargs["trust_remote_code"] and set(kwargs) == {"trust_remote_code"}:
                from moeprune.io.lazy_load import load_lazily

                model = load_lazily(path, dtype)  # the weights resident, not the mapped shards too
            if model is None:
                model = auto_model_class(config).from_pretrained(path, dtype=dtype, **kwargs)
    _restore_extensions(model, path)
    if device_map is not None:
        _dispatch(model)
    return model.eval()


def _dispatch(model: nn.Module) -> nn.Module:
    """Spread a model built on the CPU over the visible GPUs as `device_map="auto"` would
    (balanced, decoder layers never split); accelerate's hooks move activations between them."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    memory = get_balanced_memory(model, no_split_module_classes=no_split)
    device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
    dispatch_model(model, device_map=device_map)
    model.hf_device_map = dict(device_map)
    return model


def _quietly(load):
    """Run `load` with transformers' warnings muted (its expected router-mismatch report)."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return load()
    finally:
        hf_logging.set_verbosity(previous)


def _restore_extensions(model: nn.Module, path: Path) -> None:
    if getattr(model.config, "moeprune_novices", None):
        from moeprune.apply.novice import restore_novices

        restore_novices(model, path)
    if getattr(model.config, "moeprune_dynamic_skip", None):  # NAEE dynamic skipping (wraps novices too)
        from moeprune.apply.dynamic_skip import restore_dynamic_skip

        restore_dynamic_skip(model)


def pruned_skeleton(path: str | Path, dtype: torch.dtype, trust_remote_code: bool | None = None) -> nn.Module:
    """Meta skeleton of a moeprune output with what its config alone does not build: per-layer
    expert counts (`moeprune_experts_per_layer`) and channel-slimmed widths. The start of its
    reload here and of the streamed passes over an output (evaluation, dynamic-skip fit)."""
    from moeprune.adapters import find_moe_layers
    from moeprune.apply.surgery import slice_layer
    from moeprune.io.lazy_load import build_skeleton

    model = build_skeleton(path, dtype, trust_remote_code)
    config = model.config
    counts = {int(k): int(v) for k, v in (getattr(config, PER_LAYER_KEY, None) or {}).items()}
    for layer in find_moe_layers(model):
        n = counts.get(layer.layer, layer.num_experts)
        if n != layer.num_experts:
            slice_layer(layer, list(range(n)))
    if getattr(config, LAYER_WIDTH_KEY, None):  # channel-slimmed layers of different widths
        from moeprune.slimming.channels import resize_for_load

        resize_for_load(model, config)
    return model


def _load_non_uniform(path: Path, config: Any, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    from moeprune.io.safetensors_io import read_checkpoint_tensors

    from moeprune.io.lazy_reader import kept_in_fp32, set_tensor

    model = pruned_skeleton(path, dtype, trust_remote_code)
    fp32 = kept_in_fp32(model, dtype)  # what from_pretrained keeps in float32 (io.lazy_reader)

    def cast(key: str, v: torch.Tensor) -> torch.Tensor:
        return v.to(torch.float32 if fp32 is not None and fp32.search(key) else dtype) if v.is_floating_point() else v

    state = {k: cast(k, v) for k, v in read_checkpoint_tensors(path).items()}
    taken = []
    if getattr(config, "moeprune_novices", None):  # novice layers' routers keep E rows for P experts:
        shapes = {k: v.shape for k, v in model.state_dict().items()}  # taken as they are (restore_novices)
        taken = [k for k, v in state.items() if k in shapes and shapes[k] != v.shape]
        for key in taken:
            set_tensor(model, key, state.pop(key))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k not in taken]
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match its config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    for name, buf in model.named_buffers():
        if buf.device.type == "meta":
            raise ValueError(f"{path}: buffer {name} was not restored")
    return model
