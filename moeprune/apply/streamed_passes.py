"""Sparsify and layer-local router KD on the streamed path (`prune --offload --sparsify / --router-kd-local`).

Both act on one compressed decoder layer at a time, so neither needs the model in memory. They ride
on `streamed_apply` as an `OutputEdits`: when the writer has materialised decoder layer i and run
the plan's surgery on it (`edit_layer`), this module

1. runs the calibration batches' hidden states up to layer i through the layers before it (those
   without an MoE block are read from the shards here), with `engine.runner.LayerRunner`, the loop
   every layer-wise path uses;
2. sparsify: collects routed-token statistics on the compressed layer, prunes it
   (`SparsifyJob.prune`, the in-memory pass's visit), then runs it again: its pruned outputs are
   layer i+1's inputs, as in `collect.sequential_pass`;
3. local router KD: takes the dense layer i (its own skeleton, read from the shards) over the
   held-apart router-calibration tokens' dense hidden states, keeps its MoE block's inputs and
   outputs, and fits the compressed block's router to them (`fit_router_local`, same seed as
   `router_kd_local`); the dense outputs feed the dense layer i+1;

and the writer then writes the edited layer. Super experts and OWL ratios are needed before the
first layer is pruned, so when asked for they come from a pre-pass over the compressed, unpruned
layers (materialised and compressed one at a time). The results equal the in-memory `--sparsify`
/ `--router-kd-local` on the same checkpoint: the same modules run the same batches in order.
Hidden states wait in `ActivationStore`s (memory up to the budget, then disk).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from moeprune.adapters import MoELayer
from moeprune.adapters.carried_state import refuse_block_fits
from moeprune.apply.surgery import _prepare_layer, slice_layer
from moeprune.calibration.observer import Observer
from moeprune.calibration.stats import ExpertStats
from moeprune.engine.runner import LayerRunner, as_batches
from moeprune.plan import Plan
from moeprune.sparsify.collect import moe_by_decoder_index
from moeprune.sparsify.expert_weights import expert_tensor_names
from moeprune.io.lazy_load import build_skeleton
from moeprune.engine.streamed_forward import StreamedForward
from moeprune.io.lazy_reader import LazyCheckpoint, materialise, release
from moeprune.apply.output_edits import OutputEdits


class _Chain:
    """Calibration batches going through one skeleton's decoder layers in order, one `LayerRunner.step` at a time.

    Layers are read from the shards (then `edit(index)`, e.g. the plan's surgery) and freed after,
    except the ones the caller says are resident (already materialised by the writer)."""

    def __init__(self, model: nn.Module, ckpt: LazyCheckpoint, batches: list[dict[str, torch.Tensor]], device: torch.device,
                 dtype: torch.dtype, scratch: Path, budget: int, edit: Callable[[int], None] | None = None) -> None:
        self.model, self.ckpt, self.dtype, self.device, self.edit = model, ckpt, dtype, device, edit
        self.forward = StreamedForward(model, ckpt.path, dtype, device, 2 * budget, ckpt=ckpt, scratch=scratch)
        self.keymap, self.prefix = self.forward.keymap, self.forward.layer_prefix
        self.inputs, calls = self.forward.capture(batches)
        self.resident = False
        self.runner = LayerRunner(self.forward.layers, calls, device, load=self._load, release=self._release, host=True)
        self.next = 0

    def _load(self, index: int) -> None:
        unit = f"{self.prefix}.{index}"
        if not self.resident:
            materialise(self.model, self.keymap, self.ckpt, unit, self.dtype)
            if self.edit is not None:
                self.edit(index)
        if self.device.type != "cpu":
            self.model.get_submodule(unit).to(self.device)

    def _release(self, index: int) -> None:
        if not self.resident:
            unit = f"{self.prefix}.{index}"
            release(self.model, [f"{unit}.{n}" for n in self.model.get_submodule(unit).state_dict()])

    def advance(self, index: int, visit: Any = None, resident: bool = False) -> None:
        """Run the layers before `index` not yet run, then layer `index` with `visit` (`LayerRunner.step`)."""
        while self.next <= index:
            self.resident = resident and self.next == index
            outputs = self.forward.store(f"out{self.next % 2}")
            self.inputs = self.runner.step(self.next, self.inputs, visit if self.next == index else None, outputs)
            self.next += 1
        self.resident = False


def _compress(model: nn.Module, moe: MoELayer | None, plan: Plan, before: list[OutputEdits]) -> None:
    """The plan's surgery on one materialised MoE layer, as `apply_plan` does it, then the `before` edits."""
    lp = plan.layers.get(moe.layer) if moe is not None else None
    if lp is not None:
        _prepare_layer(model, moe, lp, plan.params)
        if not lp.novices:
            slice_layer(moe, lp.kept)
    for edit in before:
        if moe is not None and moe.layer in edit.layers:
            edit.edit_layer(model, moe)


@dataclass
class LocalKD:
    """Layer-local router KD on the streamed path: its settings, seed and held-apart token ids."""

    config: Any  # recover.config.RouterKDConfig
    seed: int
    ids: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def report(self, fits: dict[str, dict[str, float]]) -> dict[str, Any]:
        """The report `recover.run.run_router_kd` gives for the local variant."""
        cfg, n = self.config, max(len(fits), 1)
        local = {"steps_per_layer": cfg.local_steps, "lr": cfg.local_lr, "batch_tokens": cfg.local_batch_tokens,
                 "seed": self.seed, "mean_rel_mse_before": sum(v["rel_before"] for v in fits.values()) / n,
                 "mean_rel_mse_after": sum(v["rel_after"] for v in fits.values()) / n, "layers": fits,
                 "seconds": round(sum(v["seconds"] for v in fits.values()), 3)}
        return {**self.info, "local": local}


GLOBAL_KD_REFUSAL = ("global router KD (--router-kd N) trains every router through the whole model's logits, so it "
                     "runs in memory only; drop --offload or use --router-kd-local")


def layer_passes(recipe: Any, path: Path, plan: Plan, ids: torch.Tensor | None, tokenizer: Any, device: torch.device,
                 memory_budget: int, before: list[OutputEdits] = ()) -> list[OutputEdits]:
    """The streamed edits a recipe asks for (`sparsify:`, `router_kd: {local: true}`); [] when none.

    `before`: the edits that run on each layer first (channel slimming), repeated in the pre-pass."""
    kd_cfg, cal = recipe.router_kd, recipe.calibration
    if recipe.sparsify is None and kd_cfg is None:
        return []
    if kd_cfg is not None and kd_cfg.steps > 0:
        raise ValueError(GLOBAL_KD_REFUSAL)
    if tokenizer is None:
        from transformers import AutoTokenizer

        from moeprune.io.loading import trust_remote_code

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code())
    if ids is None:
        from moeprune.calibration.data import calibration_ids

        ids = calibration_ids(cal.source, tokenizer, cal.samples, cal.seq_len, cal.seed)
    kd = None
    if kd_cfg is not None:
        from moeprune.recover.kd_data import held_apart_ids

        started, seed = time.perf_counter(), kd_cfg.seed if kd_cfg.seed is not None else cal.seed
        kd_ids = held_apart_ids(kd_cfg.source or cal.source, tokenizer, kd_cfg.samples, kd_cfg.seq_len or cal.seq_len,
                                seed, exclude=ids)
        kd = LocalKD(kd_cfg, seed, kd_ids, {"source": kd_cfg.source or cal.source, "sequences": int(kd_ids.shape[0]),
                                            "seq_len": int(kd_ids.shape[1]), "seed": seed,
                                            "prepare_seconds": round(time.perf_counter() - started, 3)})
    job = None
    if recipe.sparsify is not None:
        from moeprune.sparsify.run import sparsify_job

        job = sparsify_job(plan=plan, **recipe.sparsify.kwargs())
    return [LayerPasses(path, plan, ids, cal.batch_size, device, memory_budget, job, kd, before)]


class LayerPasses(OutputEdits):
    """`OutputEdits` that sparsify and/or fit the router of every compressed MoE layer as it is written."""

    def __init__(self, path: Path, plan: Plan, ids: torch.Tensor, batch_size: int, device: torch.device,
                 memory_budget: int, sparsify: Any = None, kd: "LocalKD | None" = None,
                 before: list[OutputEdits] = ()) -> None:
        from moeprune.io.loading import checkpoint_dtype

        self.path, self.plan, self.device, self.dtype = Path(path), plan, torch.device(device), checkpoint_dtype(path)
        self.budget = memory_budget // 4  # inputs and outputs of the compressed and the dense chain share it
        self.batch_size, self.batches = batch_size, as_batches(ids, batch_size)
        self.job, self.kd, self.before = sparsify, kd, list(before)
        self._tmp = tempfile.TemporaryDirectory(prefix="moeprune-passes-")
        self.scratch = Path(self._tmp.name)
        self.ckpt = LazyCheckpoint(path)
        skeleton = build_skeleton(path, self.dtype)
        if kd is not None:
            refuse_block_fits(skeleton, "--router-kd-local")
        self.layers = frozenset(moe.layer for moe in moe_by_decoder_index(skeleton).values())
        self.chain: _Chain | None = None
        self.dense: _Chain | None = None
        self.zeros = [0, 0]
        self.fits: dict[str, dict[str, float]] = {}
        if self.job is not None:
            self._pre_pass(skeleton)

    def _pre_pass(self, model: nn.Module) -> None:
        """Super experts and OWL ratios of the compressed, unpruned model (what `sparsify` computes first)."""
        job = self.job
        moe_map = moe_by_decoder_index(model)
        if job.protect_super or job.needs_owl:
            stats: dict[int, Any] = {}

            def visit(index: int, layer: nn.Module, run_all: Callable[[], None]) -> None:
                moe = moe_map.get(index)
                if moe is None:
                    return
                if job.protect_super:
                    observer = Observer(model)
                    observer.layers = [m for m in observer.layers if m.layer == moe.layer]
                    with observer:
                        run_all()
                    stats[moe.layer] = observer.stats[moe.layer]
                if job.needs_owl:
                    job.owl_ratio(model, index, moe, run_all)

            chain = _Chain(model, self.ckpt, self.batches, self.device, self.dtype, self.scratch / "pre", self.budget,
                           edit=lambda index: _compress(model, moe_map.get(index), self.plan, self.before))
            last = max(moe_map)
            for index in range(last + 1):
                chain.advance(index, visit)
            if job.protect_super:
                num_layers = model.config.get_text_config().num_hidden_layers
                experts = {moe.layer: moe.num_experts for moe in moe_map.values()}  # compressed by the pre-pass
                job.use_supers(ExpertStats(stats, {"num_hidden_layers": num_layers}), num_layers, experts)
        job.set_layer_targets({i: moe.layer for i, moe in moe_map.items()})

    def edit_layer(self, model: nn.Module, layer: MoELayer) -> None:
        if self.chain is None:
            self.chain = _Chain(model, self.ckpt, self.batches, self.device, self.dtype, self.scratch / "main", self.budget)
            self.index_of = {moe.layer: i for i, moe in moe_by_decoder_index(model).items()}
        index = self.index_of[layer.layer]
        target = self._dense_block_io(index) if self.kd is not None else None
        job = self.job
        visit = (lambda i, module, run_all: job.prune(model, i, layer, run_all)) if job is not None else None
        self.chain.advance(index, visit, resident=True)
        if job is not None:
            self._measure(layer)
        if target is not None:
            from moeprune.recover.router_kd_local import fit_router_local
            from moeprune.recover.router_params import layer_router_parameters

            cfg = self.kd.config
            with torch.enable_grad():
                self.fits[str(layer.layer)] = fit_router_local(
                    layer.block, target[0], target[1], router_params=list(layer_router_parameters(layer).values()),
                    steps=cfg.local_steps, lr=cfg.local_lr, batch_tokens=cfg.local_batch_tokens, seed=self.kd.seed + layer.layer)

    def _dense_block_io(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, outputs) [N, H] of the dense MoE block of decoder layer `index` over the router-KD tokens."""
        if self.dense is None:
            model = build_skeleton(self.path, self.dtype)
            self.dense = _Chain(model, self.ckpt, as_batches(self.kd.ids, self.batch_size),
                                self.device, self.dtype, self.scratch / "dense", self.budget)
            self.dense_moe = moe_by_decoder_index(model)
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []

        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            xs.append(hidden.reshape(-1, hidden.shape[-1]).detach().float().cpu())
            ys.append(out.reshape(-1, out.shape[-1]).detach().float().cpu())

        handle = self.dense_moe[index].block.register_forward_hook(record, with_kwargs=True)
        try:
            self.dense.advance(index)
        finally:
            handle.remove()
        return torch.cat(xs), torch.cat(ys)

    def _measure(self, layer: MoELayer) -> None:
        for name in expert_tensor_names(layer.experts):
            weight = getattr(layer.experts, name).data
            nz = int((weight == 0).sum())
            self.job.report.tensors[f"{layer.experts_name}.{name}"] = nz / weight.numel()
            self.zeros[0] += nz
            self.zeros[1] += weight.numel()

    def configure(self, model: nn.Module) -> None:
        """Every layer is written: the reports go into the plan (saved next)."""
        if self.job is not None:
            self.job.finish({}, self.zeros[0] / self.zeros[1] if self.zeros[1] else 0.0, self.plan)
        if self.kd is not None:
            self.plan.params["router_kd"] = self.kd.report(self.fits)
        self.ckpt.close()
        self._tmp.cleanup()
