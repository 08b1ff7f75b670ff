"""Streamed surgery: write the pruned checkpoint shard by shard, never loading the model.

Tensors are copied from the input shards to a size-bounded `ShardedWriter`, one decoder layer at
a time. For a planned MoE layer two routes give the same bytes as the in-memory path
(`load_model` + `apply_plan` + `save_pruned`):

* selection route (uniform plans that only keep experts): per-expert keys
  (`experts.{j}.gate_proj.weight`, ...) of kept experts are copied and renumbered 0..E'-1 in the
  plan's order, dropped ones are never read; fused tensors with one row per expert (gpt-oss
  `experts.gate_up_proj`, router `weight`/`bias`, `e_score_correction_bias`) are read with
  `safe_open(...).get_slice`, kept rows only.
* layer route (merges, DERN recombination, non-uniform plans, layouts the selection route does not recognise): the one
  decoder layer is loaded into the meta skeleton with `from_pretrained`'s conversions, edited by
  the in-memory surgery (`_prepare_layer`, `slice_layer`), and saved back with
  `revert_weight_conversion` (uniform, hub layout) or in module layout (non-uniform, as
  `save_pruned` does).

The config gets the new counts through `surgery.set_expert_count` on the skeleton's config and
`checkpoint._patch_config_json`; tokenizer and other small files are copied; `moeprune_plan.json`
and a completion marker are written. Everything goes to a temporary sibling directory that is
renamed into place only when complete; on any error (e.g. `CorruptCheckpointError` for a bad
shard) it is removed, so nothing that looks complete is left behind.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from moeprune.adapters import MoELayer, find_moe_layers
from moeprune.adapters.layout import expert_modules, router_extra_rows
from moeprune.adapters.shims import expert_count_shared
from moeprune.apply.surgery import _prepare_layer, set_expert_count, slice_layer
from moeprune.io.checkpoint import PLAN_FILE, RECIPE_FILE, _patch_config_json, check_output_dir, publish_directory
from moeprune.io.output_policy import COMPLETE_MARKER, clean_stale, temp_sibling
from moeprune.io.safetensors_io import INDEX_FILE
from moeprune.plan import LayerPlan, Plan
from moeprune.io.lazy_reader import KeyMap, LazyCheckpoint, _expert_regex, release, set_tensor
from moeprune.io.loading import checkpoint_dtype
from moeprune.engine.runner import decoder_layers
from moeprune.io.lazy_load import build_skeleton
from moeprune.io.prefetch import Prefetcher
from moeprune.io.sharded_writer import ShardedWriter

logger = logging.getLogger(__name__)

_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".partial")
_NOT_COPIED = {"config.json", INDEX_FILE, PLAN_FILE, RECIPE_FILE, COMPLETE_MARKER, "moeprune_eval.json"}


def check_plan(layers: dict[int, MoELayer], plan: Plan, fingerprint: dict | None = None, force: bool = False) -> None:
    """The checks `apply_plan` makes, against the skeleton's layers (and the checkpoint's fingerprint)."""
    plan.validate()
    plan.check_model(layers, fingerprint, force=force)


def _per_expert_tensors(model: nn.Module, layer: MoELayer) -> dict[str, int]:
    """{module key: dim} of every tensor `slice_layer` slices in `layer` (dim 0, or 1 for [1, E])."""
    names = {id(m): n for n, m in model.named_modules()}
    e = layer.num_experts
    result: dict[str, int] = {}
    modules = [(m, False) for m in expert_modules(layer.experts)] + [(layer.block, False)] + \
        [(m, True) for m in layer.router.modules()]
    for module, allow_dim1 in modules:
        prefix = names[id(module)]
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if t.dim() >= 1 and t.shape[0] == e:
                result[f"{prefix}.{name}"] = 0
            elif allow_dim1 and t.dim() == 2 and t.shape[0] == 1 and t.shape[1] == e:
                result[f"{prefix}.{name}"] = 1
    return result


class _Job:
    def __init__(self, model: nn.Module, keymap: KeyMap, ckpt: LazyCheckpoint, writer: ShardedWriter, uniform: bool,
                 edits: list = ()) -> None:
        self.model, self.keymap, self.ckpt, self.writer, self.uniform = model, keymap, ckpt, writer, uniform
        self.edits = list(edits)  # output_edits.OutputEdits: per-layer edits after the plan's surgery
        self.routes = {"selection": 0, "layer": 0}
        self.novices: dict[str, torch.Tensor] = {}  # MoNE extension tensors, written next to the shards

    def copy_unit(self, keys: list[str]) -> None:
        """Tensors of a unit with no planned MoE layer: verbatim (hub layout) or as module keys."""
        if self.uniform:
            for key in self.ckpt.keys_by_shard(keys):
                self.writer.add(key, self.ckpt.get(key))
        else:
            for name, tensor in self.keymap.load_state(self.ckpt, keys).items():
                self.writer.add(name, tensor)

    def selection(self, keys: list[str], layer: MoELayer, lp: LayerPlan) -> bool:
        """Selection route; False (nothing written) when a per-expert tensor's layout is not recognised
        or the router has rows after the routed experts' (LongCat, Inkling: not E-row tensors)."""
        if router_extra_rows(layer.router, layer.num_experts):  # LongCat's identity experts included
            return False
        sliceable = _per_expert_tensors(self.model, layer)
        actions: list[tuple[str, str, Any]] = []  # (disk key, output key, rows or None)
        new_index = {j: i for i, j in enumerate(lp.kept)}
        meta = dict(self.model.state_dict())
        for key in keys:
            target = self.keymap.targets[key]
            if target.model_key not in sliceable:
                actions.append((key, key, None))
            elif target.expert_index is not None:
                if target.expert_index in new_index:
                    match = _expert_regex(target.source_pattern).search(key)
                    renamed = key[: match.start(1)] + str(new_index[target.expert_index]) + key[match.end(1) :]
                    actions.append((key, renamed, None))
            elif target.source_pattern is None and self.ckpt.shape(key) == list(meta[target.model_key].shape):
                actions.append((key, key, (lp.kept, sliceable[target.model_key])))
            else:
                return False
        for key, out_key, rows in sorted(actions, key=lambda a: (str(self.ckpt.shards[a[0]]), a[0])):
            tensor = self.ckpt.get(key) if rows is None else self.ckpt.get_rows(key, rows[0], rows[1])
            self.writer.add(out_key, tensor)
        self.routes["selection"] += 1
        return True

    def layer(self, unit: str, keys: list[str], layer: MoELayer, lp: LayerPlan | None, params: dict) -> None:
        """Layer route: load the unit, run the in-memory surgery on it, save it back."""
        from transformers.core_model_loading import revert_weight_conversion

        state = self.keymap.load_state(self.ckpt, keys)
        for name, tensor in state.items():
            set_tensor(self.model, name, tensor)
        if lp is not None:  # None: a layer the plan leaves alone that an edit changes (e.g. slimming)
            _prepare_layer(self.model, layer, lp, params)
            if lp.novices:  # experts sliced by the novice install; the router keeps E rows (apply.novice)
                from moeprune.apply.novice import novice_tensors

                self.novices.update(novice_tensors(layer, lp.num_experts))
            else:
                slice_layer(layer, lp.kept)
        for edit in self.edits:
            if layer.layer in edit.layers:
                edit.edit_layer(self.model, layer)
        module = self.model.get_submodule(unit)
        edited = {f"{unit}.{n}": t for n, t in module.state_dict().items()}
        meta = [n for n, t in edited.items() if t.device.type == "meta"]
        if meta:
            raise RuntimeError(f"{unit}: tensors {meta[:3]} were not loaded")
        out = revert_weight_conversion(self.model, edited) if self.uniform else edited
        for name, tensor in out.items():
            self.writer.add(name, tensor)
        # the module's own tensors (a shimmed module's state dict names its stock tensors instead)
        release(self.model, [f"{unit}.{n}" for n, _ in [*module.named_parameters(), *module.named_buffers()]])
        self.routes["layer"] += 1


def streamed_apply(
    input_dir: str | Path,
    plan: Plan,
    output_dir: str | Path,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    recipe: dict | None = None,
    progress: bool = True,
    selection_route: bool = True,
    force: bool = False,
    prefetch: bool = True,  # read the next layer from disk in a background thread (io.prefetch; same bytes)
    edits: list | None = None,
) -> Path:
    """Write `input_dir` pruned by `plan` to `output_dir` without loading the model; `edits`
    (`output_edits.OutputEdits`) change layers, config and the finished output before publishing."""
    from moeprune.fingerprint import checkpoint_fingerprint

    input_dir = Path(input_dir)
    out = check_output_dir(output_dir, input_dir, overwrite)
    clean_stale(out)
    ckpt = LazyCheckpoint(input_dir)  # a missing shard fails here, before anything is written
    model = build_skeleton(input_dir, dtype=checkpoint_dtype(input_dir))
    keymap = KeyMap(model, ckpt.keys())
    if keymap.unexpected:
        logger.warning("dropping %d checkpoint tensors the model does not load, e.g. %s", len(keymap.unexpected), keymap.unexpected[:3])
    layers = {layer.layer: layer for layer in find_moe_layers(model)}
    check_plan(layers, plan, checkpoint_fingerprint(input_dir), force=force)
    counts = {i: (len(plan.layers[i].kept) if i in plan.layers else layer.num_experts) for i, layer in layers.items()}
    edits = list(edits or ())
    for edit in edits:
        counts = edit.final_counts(counts)
    uniform = len(set(counts.values())) == 1 and all(edit.hub_layout() for edit in edits) \
        and not expert_count_shared(model.config.get_text_config())  # JetMoE: module layout, per-layer counts
    edited = {i for edit in edits for i in edit.layers}
    prefix, decoder = decoder_layers(model)
    units = [f"{prefix}.{i}" for i in range(len(decoder))]
    by_unit: dict[str, list[str]] = {u: keymap.keys_under(u) for u in units}
    in_layers = {k for keys in by_unit.values() for k in keys}
    rest = [k for k in keymap.targets if k not in in_layers]
    moe_of_unit = {f"{prefix}.{i}": layer for i, layer in layers.items()}
    reads = {u: _keys_read(keymap, by_unit[u], plan.layers.get(moe_of_unit[u].layer) if u in moe_of_unit else None,
                           uniform and selection_route) for u in units}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)
    tmp.mkdir()
    started = time.perf_counter()
    ahead = Prefetcher(ckpt.shards, reads, enabled=prefetch)
    writer = None
    try:
        writer = ShardedWriter(tmp, max_shard_size)
        job = _Job(model, keymap, ckpt, writer, uniform, edits)
        job.copy_unit(rest)
        for unit in tqdm(units, desc="writing layers", unit="layer", disable=not progress):
            ahead.ready(unit)  # this layer's bytes are read; the next layer's read starts in the background
            layer = moe_of_unit.get(unit)
            lp = plan.layers.get(layer.layer) if layer is not None else None
            if lp is None and (layer is None or layer.layer not in edited):
                job.copy_unit(by_unit[unit])
                continue
            simple = uniform and selection_route and lp is not None and not lp.edits_weights and not lp.novices \
                and layer.layer not in edited
            if not (simple and job.selection(by_unit[unit], layer, lp)):
                job.layer(unit, by_unit[unit], layer, lp, plan.params)
        weight_map = writer.close()
        for edit in edits:
            edit.configure(model)
        if job.novices:
            from moeprune.apply.novice import write_novice_file

            write_novice_file(job.novices, tmp)
        _write_metadata(tmp, input_dir, model, counts, plan, recipe)
        marker = {"source": str(input_dir.resolve()), "tensors": len(weight_map), "bytes": writer.total_bytes,
                  "uniform": uniform, "experts_per_layer": {str(i): n for i, n in sorted(counts.items())},
                  "routes": job.routes, "bytes_read": ckpt.bytes_read, "seconds": round(time.perf_counter() - started, 3)}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=1))
        for edit in edits:
            edit.finish(tmp)
        publish_directory(tmp, out)
    except BaseException:
        if writer is not None:
            writer.abort()  # its thread stops before the directory goes
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        ahead.close()
        ckpt.close()
    logger.info("wrote %s (%s; read ahead %.2f GB, waited %.1fs for it)", out, job.routes, ahead.bytes_read / 1e9,
                ahead.wait_seconds)
    return out


def _keys_read(keymap: KeyMap, keys: list[str], lp: LayerPlan | None, selection: bool) -> list[str]:
    """The checkpoint keys of a unit that its pass reads: all of them, or on the selection route
    (`selection` and a plan that only keeps experts) those of no dropped expert (never read)."""
    if lp is None or not selection or lp.edits_weights or lp.novices:
        return keys
    kept = set(lp.kept)
    return [k for k in keys if keymap.targets[k].expert_index is None or keymap.targets[k].expert_index in kept]


def _write_metadata(tmp: Path, input_dir: Path, model: nn.Module, counts: dict[int, int], plan: Plan, recipe: dict | None) -> None:
    set_expert_count(model, counts)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(tmp)
    _patch_config_json(tmp / "config.json", model)
    for file in sorted(input_dir.iterdir()):
        if file.is_file() and file.name not in _NOT_COPIED and not file.name.endswith(_NOT_COPIED_SUFFIXES):
            shutil.copy2(file, tmp / file.name)
    plan.save(tmp / PLAN_FILE)
    if recipe is not None:
        (tmp / RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False))


def is_complete(path: str | Path) -> bool:
    """True when `path` is a finished streamed output (its completion marker exists)."""
    return (Path(path) / COMPLETE_MARKER).is_file()
