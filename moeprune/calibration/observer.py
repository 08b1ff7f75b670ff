"""One-pass calibration observer: hooks on every router and experts module.

Router forward hooks read the logits the router returns (for N, sum p, the logit Gram matrix);
experts modules run through `capture.routed_forward`, whose arguments are the model's own selected
indices and final gates (sigmoid scoring, correction bias, group routing and scaling included), so
nothing is re-derived. Padding is excluded through the flattened attention mask set per batch. All
accumulation is in float64. Hooks return None, so the model's outputs are untouched.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from moeprune.adapters import MoELayer, find_moe_layers
from moeprune.adapters.layout import kept_columns
from moeprune.calibration.attribution import AttributionCollector, decoder_layer_of
from moeprune.calibration.capture import patch_forward, run_experts
from moeprune.calibration.peu import accumulate_peu
from moeprune.calibration.stats import ExpertStats, LayerStats
from moeprune.calibration.token_sample import TokenSampler

logger = logging.getLogger(__name__)


class Observer:
    """Context manager collecting `ExpertStats` while the model runs.

    `dense_tokens` > 0 also evaluates every expert on up to that many tokens per layer (the only
    statistic that needs experts on tokens not routed to them: HC-SMoE's output vectors); its cost
    is E x dense_tokens expert evaluations per layer.
    """

    def __init__(self, model: nn.Module, dense_tokens: int = 0, sample_tokens: int = 0, sample_seed: int = 0) -> None:
        self.model = model
        self.layers: list[MoELayer] = find_moe_layers(model)
        self.dense_tokens = int(dense_tokens)
        self.sample_tokens, self.sample_seed = int(sample_tokens), int(sample_seed)  # NAEE (token_sample.py)
        self.mask: torch.Tensor | None = None
        self.stats: dict[int, LayerStats] = {}
        self._logits: dict[int, torch.Tensor] = {}  # last router logits per layer, for reference gates
        self._attribution: dict[int, AttributionCollector] = {}
        self._undo: list = []

    def set_mask(self, attention_mask: torch.Tensor | None) -> None:
        """Valid-token mask of the next forward ([batch, seq] or flattened)."""
        self.mask = None if attention_mask is None else attention_mask.reshape(-1).bool()

    def _valid(self, n: int, device: torch.device) -> torch.Tensor:
        if self.mask is None:
            return torch.ones(n, dtype=torch.bool, device=device)
        if self.mask.numel() != n:
            raise RuntimeError(f"attention mask has {self.mask.numel()} tokens but the MoE layer saw {n}")
        return self.mask.to(device)

    def __enter__(self) -> "Observer":
        for layer in self.layers:
            layout = layer.layout
            stats = LayerStats.zeros(layout.num_experts, layout.hidden_dim, layout.intermediate_dim)
            if self.dense_tokens > 0:
                stats.tensors["dense_out_sum"] = torch.zeros(layout.num_experts, layout.hidden_dim, dtype=torch.float64)
                stats.tensors["dense_tokens"] = torch.zeros((), dtype=torch.float64)
            self.stats[layer.layer] = stats
            handle = layer.router.register_forward_hook(self._router_hook(layer, stats))
            self._undo.append(handle.remove)
            self._undo.append(patch_forward(layer.experts, self._experts_sink(layer, stats)))
            if self.sample_tokens > 0:  # seeded token sample with expert-output Gram matrices (NAEE)
                sampler = TokenSampler([layer], self.stats, self.sample_tokens, self.sample_seed, self._valid)
                self._undo.append(sampler.__enter__().__exit__)
            decoder = decoder_layer_of(self.model, layer.block_name)  # MoE-Slimming attribution
            if decoder is not None:
                self._attribution[layer.layer] = AttributionCollector(stats.tensors)
                self._undo.append(decoder.register_forward_hook(self._attribution[layer.layer].layer_hook).remove)
        return self

    def __exit__(self, *exc: object) -> None:
        for undo in self._undo:
            undo()
        self._undo.clear()

    def result(self, meta: dict | None = None) -> ExpertStats:
        info = {
            "model_type": getattr(self.model.config, "model_type", None),
            "experts_per_layer": {str(layer.layer): layer.num_experts for layer in self.layers},
            "top_k": self.layers[0].routing.top_k,
            "routing": self.layers[0].routing.as_dict(),
            "peu_top_k": self.layers[0].routing.top_k,  # PreMoE's K_a (calibration/peu.py)
        }
        info.update(meta or {})
        return ExpertStats(self.stats, info)

    # ---- hooks -------------------------------------------------------------------------------
    def _router_hook(self, layer: MoELayer, stats: LayerStats):
        index = layer.routing.logits_index
        sigmoid = layer.routing.scoring == "sigmoid"

        def hook(module: nn.Module, args: tuple, output: object) -> None:
            logits = output[index] if isinstance(output, (tuple, list)) else output
            logits = logits.detach().reshape(-1, logits.shape[-1])
            kept = kept_columns(layer.experts)  # MoNE novices: statistics of the kept experts' columns
            if kept is not None:
                logits = logits[:, kept.to(logits.device)]
            self._logits[layer.layer] = logits  # reference gates: over every column (LongCat's identity ones too)
            valid = self._valid(logits.shape[0], logits.device)
            full = logits[valid].double()
            real = layer.num_experts  # LongCat: the real experts' columns, probabilities over all columns
            l64 = full[:, :real]
            probs = full.sigmoid() if sigmoid else full.softmax(dim=-1)
            probs = probs[:, :real]
            t = stats.tensors
            t["tokens"] += l64.shape[0]
            t["prob_sum"] += probs.sum(0).cpu()
            t["logit_sum"] += l64.sum(0).cpu()
            t["logit_gram"] += (l64.T @ l64).cpu()
            accumulate_peu(t, l64, layer.routing.top_k)
            return None

        return hook

    def _experts_sink(self, layer: MoELayer, stats: LayerStats):
        num_experts = layer.num_experts

        def sink(expert_ids, token_ids, gates, act, out, top_k_index, hidden) -> None:
            valid_tokens = self._valid(hidden.shape[0], hidden.device)
            g_ref = self._reference_gates(layer, expert_ids, token_ids, top_k_index)
            rows = None if bool(valid_tokens.all()) else valid_tokens[token_ids].nonzero().squeeze(1)
            n = expert_ids.shape[0] if rows is None else rows.shape[0]
            # Rows are sorted by expert, so per-expert sums are segment reductions. Their float32
            # temporaries (outputs, activations, their squares) scale with the routed rows, so large
            # batches are reduced ROW_CHUNK rows at a time: every statistic is a sum or a maximum.
            for start in range(0, n, ROW_CHUNK):
                pick = slice(start, start + ROW_CHUNK) if rows is None else rows[start : start + ROW_CHUNK]
                _accumulate(stats.tensors, num_experts, expert_ids[pick], gates[pick].detach().float(),
                            out[pick].detach().float(), act[pick].detach().float(), g_ref[pick])
            t = stats.tensors
            if layer.layer in self._attribution:
                keep = slice(None) if rows is None else rows
                tok, ids_all = token_ids[keep], expert_ids[keep]
                gf_all = gates[keep].detach().float().unsqueeze(1) * out[keep].detach().float()
                self._attribution[layer.layer].record_routed(ids_all, tok, gf_all, valid_tokens)
            selected = torch.zeros(hidden.shape[0], num_experts, dtype=torch.float32, device=hidden.device)
            picked = top_k_index >= 0  # -1: a MoNE novice pick (capture.routed_forward)
            selected.scatter_add_(1, top_k_index.clamp_min(0), picked.float())
            selected = selected[valid_tokens]
            t["coselect"] += (selected.T @ selected).double().cpu()
            if self.dense_tokens > 0:
                self._dense_sample(layer, stats, hidden[valid_tokens])

        return sink

    def _reference_gates(self, layer: MoELayer, expert_ids, token_ids, top_k_index) -> torch.Tensor:
        """The REAP reference's gate: softmax over all E logits, renormalised over the selected
        experts iff norm_topk_prob. Equals the model's gate for softmax routers; for sigmoid routers
        it is what the reference code computes (a deviation from the model's own weighting)."""
        logits = self._logits.get(layer.layer)
        if logits is None or logits.shape[0] != top_k_index.shape[0]:
            return torch.zeros(expert_ids.shape[0], device=expert_ids.device)
        probs = logits.float().softmax(dim=-1)
        g = probs[token_ids, expert_ids]
        if layer.routing.norm_topk_prob:
            picked = top_k_index >= 0  # -1: a MoNE novice pick, outside these logits
            g = g / (probs.gather(1, top_k_index.clamp_min(0)) * picked).sum(1)[token_ids]
        return g

    def _dense_sample(self, layer: MoELayer, stats: LayerStats, hidden: torch.Tensor) -> None:
        remaining = self.dense_tokens - int(stats.tensors["dense_tokens"].item())
        if remaining <= 0 or hidden.shape[0] == 0:
            return
        sample = hidden[:remaining].detach()
        n, e = sample.shape[0], layer.num_experts
        ids = torch.arange(e, device=sample.device).repeat_interleave(n)
        _, out = run_experts(layer.experts, sample.repeat(e, 1), ids)
        stats.tensors["dense_out_sum"] += out.double().view(e, n, -1).sum(1).cpu()
        stats.tensors["dense_tokens"] += n



ROW_CHUNK = 4096  # routed (token, expert) rows reduced at once by the observer (bounds its temporaries)


def _accumulate(t: dict[str, torch.Tensor], num_experts: int, ids: torch.Tensor, g: torch.Tensor, f: torch.Tensor,
                a: torch.Tensor, g_ref: torch.Tensor) -> None:
    """Add one block of expert-sorted routed rows to the layer's sums and maxima (float32 partial
    sums per block, float64 accumulation)."""
    lengths = torch.bincount(ids, minlength=num_experts)
    norms = torch.linalg.vector_norm(f, dim=1)
    ids_cpu = ids.cpu()
    t["count"] += lengths.double().cpu()
    t["gate_sum"].index_add_(0, ids_cpu, g.double().cpu())
    t["ean_sum"].index_add_(0, ids_cpu, norms.double().cpu())
    gf = g.double() * norms.double()
    t["reap_sum"].index_add_(0, ids_cpu, gf.cpu())
    t["reap_sq_sum"].index_add_(0, ids_cpu, (gf * gf).cpu())
    t["reap_ref_sum"].index_add_(0, ids_cpu, (g_ref.double() * norms.double()).cpu())
    f_max = torch.maximum(f.amax(dim=1), -f.amin(dim=1))
    a_max = torch.maximum(a.amax(dim=1), -a.amin(dim=1))
    seg = lambda x, how="sum": torch.segment_reduce(x, how, lengths=lengths, axis=0, initial=0).double().cpu()  # noqa: E731
    torch.maximum(t["max_out"], seg(f_max, "max"), out=t["max_out"])
    torch.maximum(t["max_act"], seg(a_max, "max"), out=t["max_act"])
    t["out_sum"] += seg(f)
    t["out_sq"] += seg(f * f)
    ga2 = (g.unsqueeze(1) * a).square()
    t["act_gsq_sum"] += seg(ga2)
    torch.maximum(t["act_gmax"], seg(ga2, "max"), out=t["act_gmax"])
    t["act_sq_sum"] += seg(a * a)


def calibrate(
    model: nn.Module,
    data: torch.Tensor | Iterable[dict[str, torch.Tensor]],
    batch_size: int = 8,
    dense_tokens: int = 0,
    progress: bool = True,
    meta: dict | None = None,
    sample_tokens: int = 0,
    sample_seed: int = 0,
) -> ExpertStats:
    """Run `data` through `model` once and return the statistics of every MoE layer.

    `sample_tokens` > 0 also keeps a seeded sample of that many tokens per layer with every
    expert's output Gram matrix (what NAEE scores subsets on; `token_sample.py`).

    `data` is a LongTensor of token ids [n, seq_len] (no padding) or an iterable of batches with
    `input_ids` and optional `attention_mask`.
    """
    from moeprune.engine.runner import as_batches  # the one batching function of the layer-wise paths

    batches = as_batches(data, batch_size)
    sequences = sum(b["input_ids"].shape[0] for b in batches)
    seq_len = max(b["input_ids"].shape[1] for b in batches) if batches else 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    observer = Observer(model, dense_tokens=dense_tokens, sample_tokens=sample_tokens, sample_seed=sample_seed)
    with observer, torch.no_grad():
        for batch in tqdm(batches, desc="calibrating", disable=not progress, unit="batch"):
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            observer.set_mask(mask)
            # logits_to_keep=1: statistics need no full-vocabulary logits
            model(input_ids=ids, attention_mask=None if mask is None else mask.to(device), use_cache=False, logits_to_keep=1)
    model.train(was_training)
    info = {"sequences": int(sequences), "seq_len": int(seq_len), "dense_tokens": int(dense_tokens)}
    if sample_tokens:
        info.update(sample_tokens=int(sample_tokens), sample_seed=int(sample_seed))
    info.update(meta or {})
    return observer.result(info)
