"""Calibration statistics: one mergeable, serialisable object for every strategy.

Per MoE layer, float64 accumulators over valid (non-padding) calibration tokens:

| field            | shape  | meaning                                                        |
|------------------|--------|----------------------------------------------------------------|
| tokens           | []     | N, tokens seen by the layer                                    |
| count            | [E]    | |X_j|, tokens routed to expert j (the model's own selection)    |
| gate_sum         | [E]    | sum of the effective gate g_j over routed tokens               |
| prob_sum         | [E]    | sum of the full router probability p_j over all tokens         |
| ean_sum          | [E]    | sum of ||f_j(x)||_2 over routed tokens (EAN)                   |
| reap_sum         | [E]    | sum of g_j(x) * ||f_j(x)||_2 over routed tokens (REAP numerator) |
| reap_sq_sum      | [E]    | sum of (g_j(x) * ||f_j(x)||_2)^2 over routed tokens (unified criterion, alpha=beta=2) |
| reap_ref_sum     | [E]    | the same with the REAP reference's softmax gate (differs for sigmoid routers) |
| max_out          | [E]    | max ||f_j(x)||_inf over routed tokens (super experts)           |
| max_act          | [E]    | max |a_j(x)| at the down-projection input                      |
| coselect         | [E, E] | times i and j were selected together (diagonal = count)        |
| logit_gram       | [E, E] | sum of l(x) l(x)^T (router-logit cosine similarity, M-SMoE)     |
| logit_sum        | [E]    | sum of router logits                                           |
| out_sum, out_sq  | [E, H] | sum f_j and sum f_j^2 per dimension over routed tokens (MoNE)  |
| act_gsq_sum      | [E, I] | sum (g_j a_j)^2 per intermediate channel (CAMERA-style scores)  |
| act_gmax         | [E, I] | max (g_j a_j)^2 per channel over routed tokens (CAMERA L-inf)   |
| act_sq_sum       | [E, I] | sum a_j^2 per channel over routed tokens (MoE-Slimming channels) |
| attr_sum         | [E]    | sum g <m, f_j> / ||y||^2 over routed tokens (calibration/attribution.py) |
| layer_loss_sum   | []     | sum ||m||^2 / ||y||^2 over tokens (m routed MoE output, y layer output) |
| peu_hist         | [E, B+1] | PreMoE: f(logit) of top-K_a entries by local-prob bin (calibration/peu.py) |
| peu_maxp_sum     | []     | PreMoE: sum of the max local top-K_a probability (threshold r_l) |
| dense_out_sum    | [E, H] | optional: sum of f_j over a token sample, every expert (HC-SMoE) |
| dense_tokens     | []     | optional: size of that sample                                  |
| sample_keys, sample_logits, sample_gates, sample_gram | [n], [n, E], [n, E], [n, E, E] | optional: seeded token sample with every expert's output Gram (NAEE, `token_sample.py`) |

`merge` adds sums and takes maxima, so statistics of two halves merged equal the whole's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moeprune.calibration.peu import PEU_BINS

MAX_FIELDS = ("max_out", "max_act", "act_gmax")
OPTIONAL_FIELDS = ("dense_out_sum", "dense_tokens")
# optional token sample (calibration/token_sample.py, NAEE): rows, not sums; merged by smallest key
SAMPLE_FIELDS = ("sample_keys", "sample_logits", "sample_gates", "sample_gram")
FORMAT_VERSION = 1


@dataclass
class LayerStats:
    """Accumulators of one MoE layer (all float64)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def zeros(cls, num_experts: int, hidden: int, intermediate: int) -> "LayerStats":
        e = num_experts
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        return cls(
            {
                "tokens": z(()),
                "count": z(e),
                "gate_sum": z(e),
                "prob_sum": z(e),
                "ean_sum": z(e),
                "reap_sum": z(e),
                "reap_sq_sum": z(e),
                "reap_ref_sum": z(e),
                "max_out": z(e),
                "max_act": z(e),
                "coselect": z(e, e),
                "logit_gram": z(e, e),
                "logit_sum": z(e),
                "out_sum": z(e, hidden),
                "out_sq": z(e, hidden),
                "act_gsq_sum": z(e, intermediate),
                "act_gmax": z(e, intermediate),
                "act_sq_sum": z(e, intermediate),
                "attr_sum": z(e),
                "layer_loss_sum": z(()),
                "peu_hist": z(e, PEU_BINS + 1),
                "peu_maxp_sum": z(()),
            }
        )

    def __getattr__(self, name: str) -> torch.Tensor:
        tensors = self.__dict__.get("tensors", {})
        if name in tensors:
            return tensors[name]
        raise AttributeError(name)

    @property
    def num_experts(self) -> int:
        return int(self.tensors["count"].shape[0])

    def merge_(self, other: "LayerStats") -> "LayerStats":
        for name, value in other.tensors.items():
            if name in SAMPLE_FIELDS:
                continue
            if name not in self.tensors:
                self.tensors[name] = value.clone()
            elif name in MAX_FIELDS:
                torch.maximum(self.tensors[name], value, out=self.tensors[name])
            else:
                self.tensors[name] += value
        if "sample_keys" in other.tensors:
            self._merge_sample(other)
        return self

    def _merge_sample(self, other: "LayerStats") -> None:
        """A token sample is rows, not sums: the union, cut back to the larger size by smallest key."""
        mine = {n: self.tensors.get(n, other.tensors[n][:0]) for n in SAMPLE_FIELDS}
        size = max(mine["sample_keys"].numel(), other.tensors["sample_keys"].numel())
        joined = {n: torch.cat([mine[n], other.tensors[n]]) for n in SAMPLE_FIELDS}
        order = torch.argsort(joined["sample_keys"], stable=True)[:size]
        self.tensors.update({n: joined[n][order] for n in SAMPLE_FIELDS})

    # ---- derived quantities used by strategies ---------------------------------------------
    def frequency(self) -> torch.Tensor:
        return self.count

    def soft_frequency(self) -> torch.Tensor:
        return self.gate_sum

    def mean_prob(self) -> torch.Tensor:
        return self.prob_sum / self.tokens.clamp_min(1)

    def reap(self) -> torch.Tensor:
        """Mean over routed tokens of g * ||f||; 0 for experts never selected."""
        return torch.where(self.count > 0, self.reap_sum / self.count.clamp_min(1), torch.zeros_like(self.count))

    def reap_reference(self) -> torch.Tensor:
        """REAP with the reference code's gate (softmax over all logits) instead of the model's."""
        ref = self.tensors.get("reap_ref_sum", torch.zeros_like(self.count))
        return torch.where(self.count > 0, ref / self.count.clamp_min(1), torch.zeros_like(self.count))

    def ean(self) -> torch.Tensor:
        return self.ean_sum

    def output_mean(self) -> torch.Tensor:
        return self.out_sum / self.count.clamp_min(1).unsqueeze(1)

    def output_std(self) -> torch.Tensor:
        """MoNE's phi_var: sqrt(sum ||f - mu||^2 / (n - 1)) per expert."""
        n = self.count
        ss = (self.out_sq - self.out_sum**2 / n.clamp_min(1).unsqueeze(1)).sum(1).clamp_min(0)
        return torch.where(n > 1, (ss / (n - 1).clamp_min(1)).sqrt(), torch.zeros_like(n))


@dataclass
class ExpertStats:
    """Statistics of every MoE layer plus provenance metadata."""

    layers: dict[int, LayerStats]
    meta: dict = field(default_factory=dict)

    def merge(self, other: "ExpertStats") -> "ExpertStats":
        """A new object: sums added, maxima taken, over layers present in either."""
        out = ExpertStats({i: LayerStats({k: v.clone() for k, v in s.tensors.items()}) for i, s in self.layers.items()})
        out.meta = dict(self.meta)
        for index, stats in other.layers.items():
            if index in out.layers:
                if out.layers[index].num_experts != stats.num_experts:
                    raise ValueError(f"layer {index}: cannot merge stats of {out.layers[index].num_experts} and {stats.num_experts} experts")
                out.layers[index].merge_(stats)
            else:
                out.layers[index] = LayerStats({k: v.clone() for k, v in stats.tensors.items()})
        out.meta["sequences"] = self.meta.get("sequences", 0) + other.meta.get("sequences", 0)
        return out

    def digest(self) -> str:
        """sha256 over every tensor's bytes, in a fixed order: identifies the stats a plan used."""
        h = hashlib.sha256()
        for index in sorted(self.layers):
            for name in sorted(self.layers[index].tensors):
                h.update(f"{index}.{name}".encode())
                h.update(self.layers[index].tensors[name].contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        flat = {f"layer.{i}.{k}": v.contiguous() for i, s in self.layers.items() for k, v in s.tensors.items()}
        header = {"format": "moeprune-stats", "version": str(FORMAT_VERSION), "meta": json.dumps(self.meta)}
        tmp = path.with_name(path.name + ".partial")
        save_file(flat, str(tmp), metadata=header)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ExpertStats":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"statistics file not found: {path}")
        with safe_open(str(path), "pt") as handle:
            header = handle.metadata() or {}
        if header.get("format") != "moeprune-stats":
            raise ValueError(f"{path} is not a moeprune statistics file")
        layers: dict[int, LayerStats] = {}
        for key, value in load_file(str(path)).items():
            _, index, name = key.split(".", 2)
            layers.setdefault(int(index), LayerStats()).tensors[name] = value
        return cls(layers, json.loads(header.get("meta", "{}")))
