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

from moeprune.testing.shrunk_configs import shrunk_config

MAX_PARAMS = 20_000_000


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
        check = _tie_free_batch(model, dropped, {layer.layer: layer.routing.top_k for layer in layers})
        if check is None:
            masked, result.checks["masked"] = None, "n/a (tied router logits in every batch tried)"
        else:
            with mask_experts(model, dropped):
                masked = _logits(model, check)
    apply(model, p)
    pruned = _logits(model, ids)
    if not torch.isfinite(pruned).all():
        result.checks["finite"] = "NON-FINITE"
    if masked is not None:
        gap = (_logits(model, check) - masked).abs().max().item()
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


def _tie_free_batch(model: nn.Module, dropped: dict[int, list[int]], top_k: dict[int, int],
                    tries: int = 10) -> torch.Tensor | None:
    """A batch on which no masked router has two experts tied at its top-k boundary (seeds 0..), or
    None. In bf16 router logits tie often, and a tie may be broken either way by the original and
    the pruned router (other widths, other kernels): both are right, so such a batch proves nothing."""
    from moeprune.evaluation.routing_mask import mask_experts
    from moeprune.testing.tiny_models import random_batch

    for seed in range(tries):
        ids = random_batch(model.config.get_text_config().vocab_size, batch=2, seq_len=10, seed=seed)
        record: dict[int, list[torch.Tensor]] = {}
        with mask_experts(model, dropped, record=record):
            _logits(model, ids)
        tied = False
        for index, calls in record.items():
            for logits in calls:
                top = logits.float().topk(top_k[index] + 1, dim=-1).values
                tied |= bool(((top[..., -2] == top[..., -1]) & torch.isfinite(top[..., -1])).any())
        if not tied:
            return ids
    return None


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
