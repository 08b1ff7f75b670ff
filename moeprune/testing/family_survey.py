"""Survey every MoE family of the installed transformers: does moeprune prune it right, or refuse it?

The family table (`tests/test_families.py`) covers the families with a hand-written tiny config.
transformers ships many more MoE families, and discovery is family-agnostic, so an untested family is
either pruned correctly, refused in one line, or -- the case this module exists to catch -- pruned
into a silently wrong model. For each family this builds a tiny model from its config class's
defaults with every size shrunk (`shrunk_config`), then checks, with references that do not share
moeprune's routing code:

- keep-all: a plan that keeps every expert reproduces the logits bit for bit;
- masked: pruning half the experts equals the original with the dropped experts' router logits set
  to -inf where the router computes them (`evaluation.routing_mask.mask_experts`: the router's own
  code then routes); only for routers without group-limited selection (those regroup after pruning);
- reload: the saved checkpoint reloads with stock `from_pretrained` to the pruned logits, with the
  config's expert counts shrunk.

`scripts/survey_families.py` prints the table; the slow test asserts that no family is wrong.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from torch import nn

# attribute -> tiny value, applied where a family's config has the attribute
SMALL_SIZES: dict[str, object] = {
    "vocab_size": 272, "hidden_size": 32, "d_model": 32, "num_hidden_layers": 2, "num_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 48,
    "ffn_hidden_size": 48, "moe_intermediate_size": 24, "expert_ffn_hidden_size": 24,
    "shared_expert_intermediate_size": 48, "moe_shared_expert_intermediate_size": 48,
    "num_experts": 8, "num_local_experts": 8, "n_routed_experts": 8, "moe_num_experts": 8,
    "num_experts_per_tok": 2, "moe_topk": 2, "moe_k": 2, "n_shared_experts": 1, "num_shared_experts": 1,
    "moe_num_shared_experts": 1, "first_k_dense_replace": 0, "n_group": 1, "num_expert_group": 1,
    "topk_group": 1, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "v_head_dim": 8, "max_position_embeddings": 256, "sliding_window": 16, "decoder_sparse_step": 1,
    "moe_layer_freq": 1, "mlp_only_layers": [], "tie_word_embeddings": False, "bos_token_id": 256,
    "eos_token_id": 256, "pad_token_id": 256, "attention_chunk_size": 64, "linear_num_value_heads": 4,
    "linear_num_key_heads": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8, "zero_expert_num": 0,
    "num_experts_per_token": 2, "top_k_experts": 2, "unpadded_vocab_size": 260, "shared_intermediate_size": 48,
    "shared_experts_intermediate_size": 48, "linear_head_dim": 8, "linear_num_heads": 4, "mamba_n_heads": 4,
    "mamba_d_head": 8, "mamba_chunk_size": 16, "router_hidden_size": 16, "index_head_dim": 8, "index_n_heads": 2,
    "index_topk": 4, "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8, "num_dense_layers": 0,
    "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 272, "attn_layer_period": 2,
    "attn_layer_offset": 1, "expert_layer_period": 1, "expert_layer_offset": 0, "ngram_vocab_size_base": 64,
    "moe_hidden_size": 32, "projector_hidden_size": 48, "out_hidden_size": 32,
}
VISION_SIZES: dict[str, object] = {
    "depth": 1, "num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 48, "num_heads": 4,
    "num_attention_heads": 4, "out_hidden_size": 32, "deepstack_visual_indexes": [0], "num_position_embeddings": 64,
}
# sizes set even where the default is None (the family then builds with experts)
FORCED = ("n_routed_experts", "num_experts", "num_experts_per_tok", "n_shared_experts", "top_k_experts",
          "moe_intermediate_size", "head_dim", "sliding_window", "indexer_n_heads", "indexer_kv_heads", "indexer_head_dim")
# model_type -> fields a family needs beyond the sizes
FAMILY_FIELDS: dict[str, dict[str, object]] = {
    "gemma4": {"enable_moe_block": True}, "doge": {"is_moe": True}, "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "granitemoehybrid": {"mamba_n_heads": 8, "layer_types": ["linear_attention", "full_attention"]},
    "dots3_note": {"head_dim": 16}, "mistral4": {"head_dim": 16},
    "glm4v_moe": {"rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5, "rope_type": "default",
                                      "mrope_section": [1, 0, 1]}},
    "hy_v4_vl": {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "default", "mrope_section": [2, 1, 1]}}, "zaya": {"num_experts_per_tok": 1},
    "qwen4_exp": {"indexer_budget": 8, "indexer_compress_ratio": 2},
    "glm5_next": {"index_kpool": 2, "qk_rope_head_dim": 0},
    "deepseek_ocr2": {"mlp_layer_types": ["sparse", "sparse"]},
    "ernie4_5_vl_moe": {"moe_intermediate_size": [24, 16],  # text and vision experts' widths; 3-D RoPE of 8 dims
                        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default", "mrope_section": [1, 1, 2]}},  # DSA layers: top-k a multiple of the pool, no RoPE
}
# a SAM image encoder (the OCR families' first vision stage), one block
SAM_SIZES: dict[str, object] = {"hidden_size": 32, "output_channels": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                                "global_attn_indexes": [0], "mlp_dim": 48, "downsample_channels": [32, 32], "image_size": 64}
# model_type -> {encoder config key: fields beyond VISION_SIZES}
ENCODER_FIELDS: dict[str, dict[str, dict[str, object]]] = {
    "muse_spark": {"audio_config": {"patch_sizes": [16], "hidden_sizes": [32], "depths": [1]}},
    "deepseek_ocr2": {"vision_config": {"sam_config": SAM_SIZES, "encoder_config": {  # SAM, then a Qwen2-like encoder
        "vocab_size": 272, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_window_layers": 1, "layer_types": ["full_attention"]}}},
    "unlimited_ocr": {"vision_config": {"sam_config": SAM_SIZES, "encoder_config": {  # SAM and a CLIP-like encoder
        "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4}}},
}
MAX_PARAMS = 20_000_000
LAYER_LISTS = ("layer_types", "mlp_layer_types", "layers_block_type", "hybrid_override_pattern")


@dataclass
class FamilyResult:
    """What the survey found for one family."""

    family: str
    status: str  # ok | refused | wrong | no-causal-lm | no-tiny-model | error
    detail: str = ""
    checks: dict[str, str] = field(default_factory=dict)


@functools.lru_cache(maxsize=1)
def moe_families() -> tuple[str, ...]:
    """model_type of every transformers family whose modeling file defines an experts/MoE class."""
    root = Path(transformers.__file__).parent / "models"
    pattern = re.compile(r"class \w*(Experts|SparseMoe|MoE|Moe)\w*\(")
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if any(pattern.search(f.read_text()) for f in folder.glob("modeling_*.py")):
            found.append(folder.name)
    return tuple(found)


def causal_lm_type(family: str) -> str | None:
    """The model_type of `family`'s causal LM (its text model for multimodal families), if any."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from moeprune.io.auto_class import text_model_class

    text = f"{family}_text"  # a multimodal family's text model first, when it is a causal LM itself
    if text_model_class(SimpleNamespace(model_type=text)) is AutoModelForCausalLM:
        return text
    return family if text_model_class(SimpleNamespace(model_type=family)) is not None else None


def shrunk_config(model_type: str) -> transformers.PretrainedConfig:
    """`model_type`'s tiny config: the hand-written one of the family table where there is one, else
    the class's defaults with every known size shrunk (only the shrunk fields are passed, so that the
    fields a config derives from them are derived again)."""
    from moeprune.testing.tiny_models import FAMILY_CONFIGS, MORE_FAMILY_CONFIGS, tiny_config

    if model_type in FAMILY_CONFIGS or model_type in MORE_FAMILY_CONFIGS:
        return tiny_config(model_type)
    cls = transformers.AutoConfig.for_model(model_type).__class__
    values = _shrunk_values(cls().to_dict(), model_type)
    defaults = cls().to_dict()
    text = defaults.get("text_config")
    if isinstance(text, dict):  # a multimodal family's causal LM: shrink its text model too
        values["text_config"] = _shrunk_values(text, model_type)
    for key in ("vision_config", "audio_config"):  # an image-text-to-text model: one-block encoders
        if isinstance(defaults.get(key), dict):
            values[key] = {**{k: v for k, v in VISION_SIZES.items() if k in defaults[key]},
                           **ENCODER_FIELDS.get(model_type, {}).get(key, {})}
    return cls(**values)


def _shrunk_values(defaults: dict, model_type: str) -> dict:
    """The fields of one (sub-)config to pass: tiny sizes, family fields, trimmed per-layer lists."""
    values = {key: small for key, small in SMALL_SIZES.items()
              if defaults.get(key) is not None or (key in FORCED and key in defaults)}
    values.update(FAMILY_FIELDS.get(model_type.removesuffix("_text"), {}))
    for key, sub in defaults.items():  # nested size dicts (DBRX's attn_config / ffn_config)
        if isinstance(sub, dict) and key.endswith("_config") and not key.startswith(("text", "vision", "audio")):
            values[key] = {**sub, **{k: v for k, v in SMALL_SIZES.items() if sub.get(k) is not None}}
    if defaults.get("kv_lora_rank") is not None:  # multi-head latent attention: one kv head per query head
        values["num_key_value_heads"] = values.get("num_attention_heads", 4)
    layers = values.get("num_hidden_layers") or values.get("num_layers") or 2
    for key in LAYER_LISTS:
        if key not in values and isinstance(defaults.get(key), (list, str)) and len(defaults[key]) > layers:
            seen = list(dict.fromkeys(defaults[key]))  # keep one of each layer kind, in order
            kinds = (seen + list(defaults[key]))[:max(layers, len(seen))]
            values[key] = kinds if isinstance(defaults[key], list) else "".join(kinds)
            layers = len(kinds)
    for key in ("num_hidden_layers", "num_layers"):
        if key in values:
            values[key] = layers
    for key, sub in defaults.items():  # per-layer dicts keyed by layer index
        if isinstance(sub, dict) and sub and all(str(k).isdigit() for k in sub):
            values[key] = {k: v for k, v in sub.items() if int(k) < layers}
    return values


def seeded_model(config: transformers.PretrainedConfig, seed: int = 0) -> nn.Module:
    """A float32 causal LM of `config` with seeded weights and decisive (scaled-up) routers."""
    from moeprune.adapters import find_moe_layers
    from moeprune.adapters.layout import SELECTION_BIAS_NAMES
    from moeprune.io.auto_class import auto_model_class

    with torch.device("meta"):
        size = sum(p.numel() for p in auto_model_class(config).from_config(config).parameters())
    if size > MAX_PARAMS:
        raise ValueError(f"the shrunk config still has {size / 1e6:.0f}M parameters (a size this survey does not shrink)")
    torch.manual_seed(seed)
    model = auto_model_class(config).from_config(config, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
            elif name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        try:
            layers = find_moe_layers(model)
        except ValueError:
            return model
        for layer in layers:
            for name, param in layer.router.named_parameters():
                if param.dim() == 2:
                    param.mul_(8.0)
            owners = [*layer.router.named_modules(), ("", layer.block)]
            for _, module in owners:  # selection biases matter to the reference: make them non-zero
                for name in SELECTION_BIAS_NAMES:
                    tensor = getattr(module, name, None)
                    if isinstance(tensor, torch.Tensor):  # routed columns only (ZAYA's skip class is fixed)
                        routed = tensor[..., :layer.num_experts]
                        routed.copy_(torch.randn(routed.shape, generator=generator) * 0.05)
    return model


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def check_family(family: str, workdir: Path, streamed: bool = True, strategy: str = "reap",
                 dtype: torch.dtype = torch.float32) -> FamilyResult:
    """Run the survey's checks on one family (see the module docstring), pruning half the experts
    with `strategy` (the masked check only for plans that select experts, without merges or novices)."""
    from moeprune.adapters.discovery import NotAnMoEModelError
    from moeprune.adapters import find_moe_layers

    model_type = causal_lm_type(family)
    if model_type is None:
        return FamilyResult(family, "no-causal-lm", "no causal-LM class in transformers' auto mapping")
    try:
        model = seeded_model(shrunk_config(model_type))
        with torch.no_grad():  # the tiny config must run as it is, before moeprune touches it
            model(torch.randint(0, 256, (1, 6)))
    except Exception as exc:  # noqa: BLE001 - the survey reports whatever stops a family
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
        return FamilyResult(family, "no-tiny-model", f"{type(exc).__name__}: {' / '.join(lines)[:240]}")
    try:
        find_moe_layers(model)
    except NotAnMoEModelError as exc:
        return FamilyResult(family, "refused", str(exc))
    from moeprune.plan import PlanError

    result = FamilyResult(family, "error")
    try:
        _run_checks(model, workdir / family, result, streamed, strategy, dtype)
        bad = [k for k, v in result.checks.items() if "DIFFERS" in v or "NON-FINITE" in v or "UNEQUAL" in v]
        result.status = "wrong" if bad else "ok"
    except PlanError as exc:  # the strategy refuses this family's routing, in one line
        result.status, result.detail = "refused", f"{strategy}: {exc}"
    except Exception as exc:  # noqa: BLE001
        last = traceback.extract_tb(exc.__traceback__)[-1]
        result.status = "error"
        result.detail = (f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]} "
                         f"({Path(last.filename).name}:{last.lineno})")
    return result


def _run_checks(original: nn.Module, root: Path, result: FamilyResult, streamed: bool, strategy: str,
                dtype: torch.dtype) -> None:
    from moeprune import apply, calibrate, plan, save
    from moeprune.adapters import find_moe_layers
    from moeprune.adapters.shims import expert_count_shared
    from moeprune.evaluation.routing_mask import mask_experts
    from moeprune.io.checkpoint import load_pruned
    from moeprune.io.auto_class import auto_model_class
    from moeprune.io.loading import load_model
    from moeprune.strategies import get_strategy
    from moeprune.testing.tiny_models import random_batch
    from moeprune.testing.tiny_tokenizer import byte_tokenizer

    src = root / "input"
    _as_stock_checkpoint(original, dtype).save_pretrained(src, max_shard_size="20KB")  # several shards
    byte_tokenizer().save_pretrained(src)
    model = load_model(str(src), dtype="auto")[0]  # the checkpoint's own dtype
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2  # pruned vs masked: other kernels, other rounding
    layers = find_moe_layers(model)
    first, counts_before = layers[0], {layer.layer: layer.num_experts for layer in layers}
    result.detail = (f"{len(layers)} MoE layers x {first.num_experts} experts, top-{first.routing.top_k}, "
                     f"{first.routing.scoring}, layout {first.layout.describe()}")
    ids = random_batch(model.config.get_text_config().vocab_size, batch=2, seq_len=10)
    reference = _logits(model, ids)
    stats = calibrate(model, ids, progress=False, dense_tokens=get_strategy(strategy).dense_tokens)
    apply(model, plan(stats, "frequency", 0.0))
    result.checks["keep-all"] = "exact" if torch.equal(_logits(model, ids), reference) else "DIFFERS"
    p = plan(stats, strategy, 0.5, model=model)
    dropped = {i: sorted(set(range(counts_before[i])) - set(lp.kept)) for i, lp in p.layers.items()}
    edits = any(lp.merges or lp.novices or lp.recombine_threshold is not None for lp in p.layers.values())
    if edits:
        masked, result.checks["masked"] = None, "n/a (merges or novices)"
    elif any(layer.routing.n_group > 1 and layer.routing.topk_group < layer.routing.n_group for layer in layers):
        masked, result.checks["masked"] = None, "n/a (group-limited routing)"
    else:
        with mask_experts(model, dropped):
            masked = _logits(model, ids)
    apply(model, p)
    pruned = _logits(model, ids)
    if not torch.isfinite(pruned).all():
        result.checks["finite"] = "NON-FINITE"
    if masked is not None:
        gap = (pruned - masked).abs().max().item()
        result.checks["masked"] = "equal" if gap <= tolerance else f"DIFFERS by {gap:.3g}"
    out = save(model, root / "in-memory", plan=p, input_dir=src)
    non_uniform = len({len(lp.kept) for lp in p.layers.values()}) > 1
    if expert_count_shared(model.config) or non_uniform or any(lp.novices for lp in p.layers.values()):
        reloaded = load_pruned(out, dtype="auto")  # moeprune's extensions (stock loading refuses them)
    else:
        reloaded = auto_model_class(transformers.AutoConfig.from_pretrained(out)).from_pretrained(out, dtype="auto").eval()
    gap = (_logits(reloaded, ids) - pruned).abs().max().item()
    result.checks["reload"] = "equal" if gap <= (1e-5 if dtype == torch.float32 else 1e-2) else f"DIFFERS by {gap:.3g}"
    result.checks["dtypes"] = _dtype_check(src, out)
    counts = {layer.layer: layer.num_experts for layer in find_moe_layers(reloaded)}
    planned = {i: len(lp.kept) for i, lp in p.layers.items()}
    result.checks["reloaded experts"] = ",".join(map(str, sorted(set(counts.values())))) + \
        ("" if counts == planned else " UNEQUAL to the plan")
    if streamed:
        try:
            result.checks["streamed"] = _streamed_check(src, ids, stats, p, out, root / "streamed", strategy)
        except ValueError as exc:
            if "\n" in str(exc):
                raise
            result.checks["streamed"] = f"refused: {exc}"


def _as_stock_checkpoint(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model` in `dtype` with the tensors transformers keeps in float32 left in float32, as a
    checkpoint saved from a model loaded in `dtype` holds them."""
    from moeprune.io.lazy_reader import kept_in_fp32

    pattern = kept_in_fp32(model, dtype)
    model = model.to(dtype)
    if pattern is not None:
        for module_name, module in model.named_modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if pattern.search(f"{module_name}.{name}" if module_name else name):
                    param.data = param.data.float()
            for name, buf in list(module.named_buffers(recurse=False)):
                if buf is not None and buf.is_floating_point() and pattern.search(f"{module_name}.{name}" if module_name else name):
                    module._buffers[name] = buf.float()
    return model


def _dtype_check(src: Path, out: Path) -> str:
    """Every output tensor in its input tensor's dtype (the checkpoint's own, fp32-kept ones included)."""
    from moeprune.io.safetensors_io import read_checkpoint_tensors

    a, b = read_checkpoint_tensors(src), read_checkpoint_tensors(out)
    changed = [f"{k}: {a[k].dtype} -> {b[k].dtype}" for k in b if k in a and a[k].dtype != b[k].dtype]
    return f"DIFFERS ({changed[:2]})" if changed else "kept"


def _streamed_check(src: Path, ids: torch.Tensor, stats, in_memory, reference: Path, out: Path, strategy: str) -> str:
    """`--offload`'s calibration and apply from the shards: same statistics, plan and tensors."""
    from moeprune.apply.streamed import streamed_apply
    from moeprune.calibration.streamed import streamed_calibrate
    from moeprune.io.safetensors_io import read_checkpoint_tensors
    from moeprune.engine.expert_reader import LazyExpertWeights
    from moeprune.strategies import get_strategy, plan

    spec = get_strategy(strategy)
    streamed_stats = streamed_calibrate(src, ids, progress=False, dense_tokens=spec.dense_tokens)
    if streamed_stats.digest() != stats.digest():
        return "DIFFERS (statistics)"
    if spec.needs_weights:  # what --offload passes: the shards, one MoE layer at a time
        with LazyExpertWeights(src) as weights:
            p = plan(streamed_stats, strategy, 0.5, model=weights)
    else:
        p = plan(streamed_stats, strategy, 0.5)
    if p.layers != in_memory.layers:
        return "DIFFERS (plan)"
    streamed_apply(src, p, out, max_shard_size="20KB", progress=False)
    a, b = read_checkpoint_tensors(reference), read_checkpoint_tensors(out)
    if sorted(a) != sorted(b):
        return f"DIFFERS (tensor names: {sorted(set(a) ^ set(b))[:3]})"
    unequal = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    if any(lp.novices for lp in p.layers.values()):  # MoNE's extension file next to the shards
        from safetensors.torch import load_file

        from moeprune.apply.novice import NOVICE_FILE

        x, y = load_file(reference / NOVICE_FILE), load_file(out / NOVICE_FILE)
        unequal += [k for k in x if k not in y or not torch.equal(x[k], y[k])]
    return f"DIFFERS ({unequal[:3]})" if unequal else "equal"


def survey(families: Sequence[str] | None = None, strategy: str = "reap",
           dtype: torch.dtype = torch.float32) -> list[FamilyResult]:
    """`check_family` for each of `families` (default: every MoE family of transformers)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results = []
    with tempfile.TemporaryDirectory(prefix="moeprune-survey-") as tmp:
        for family in families or moe_families():
            results.append(check_family(family, Path(tmp), strategy=strategy, dtype=dtype))
    return results


def as_json(results: Sequence[FamilyResult]) -> str:
    return json.dumps([asdict(r) for r in results], indent=1)
