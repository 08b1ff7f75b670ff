"""Teacher next-token distributions cached as top-k log-probabilities plus the tail mass.

Router KD (`moeprune.recover.router_kd`) needs the uncompressed model's next-token distribution at
every calibration position. Keeping the full |V|-wide distribution costs |V| floats per token, and
keeping the teacher in memory next to the student doubles the weights, so the teacher is run once,
BEFORE compression, and only this is kept per predicting position t (0..L-2, predicting token t+1):

- `top_index` [n, L-1, k] (int32): the k most likely next tokens under softmax(z / tau);
- `top_logprob` [n, L-1, k] (float32): their log-probabilities log p_i;
- `tail_logmass` [n, L-1] (float32): log(1 - sum_i p_i), the probability of every other token.

The KL that `topk_kl` computes is then the KL between the two (k+1)-bin distributions (the k
teacher-top tokens, one bin for the rest): KL(p~ || q~) = sum_i p_i log(p_i / q_i) +
p_tail log(p_tail / q_tail), with q_tail = 1 - sum_i q_i from the student's full logits. By the
data-processing inequality it is a lower bound on the full-vocabulary KL and equals it when k >= |V|
(tail mass 0). This is a deviation from the paper (which uses full logits), made for memory; k=64
keeps >= 0.9 of the teacher mass on the bundled models. The cost is 8 bytes x k per token
(64: 512 B/token, 8 MB for 16k tokens).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from moeprune.engine.runner import as_batches

__all__ = ["TeacherCache", "build_teacher_cache", "topk_kl", "kd_loss", "log1mexp"]


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and near -inf (-inf at x = 0)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@dataclass
class TeacherCache:
    """Top-k teacher log-probabilities at every predicting position of `input_ids`."""

    input_ids: torch.Tensor
    top_index: torch.Tensor
    top_logprob: torch.Tensor
    tail_logmass: torch.Tensor
    temperature: float = 1.0
    attention_mask: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_sequences(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.top_index.shape[-1])

    def target_mask(self) -> torch.Tensor:
        """[n, L-1] float: 1 where position t and its next token t+1 are both real tokens."""
        if self.attention_mask is None:
            return torch.ones(self.top_index.shape[:2])
        m = self.attention_mask.float()
        return m[:, :-1] * m[:, 1:]

    def batch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The cached tensors of sequences `rows`, as keyword arguments of `kd_loss` (+ input_ids)."""
        out = {"input_ids": self.input_ids[rows], "top_index": self.top_index[rows].long(),
               "top_logprob": self.top_logprob[rows], "tail_logmass": self.tail_logmass[rows],
               "mask": self.target_mask()[rows]}
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask[rows]
        return out

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tensors = {"input_ids": self.input_ids.contiguous(), "top_index": self.top_index.contiguous(),
                   "top_logprob": self.top_logprob.contiguous(), "tail_logmass": self.tail_logmass.contiguous()}
        if self.attention_mask is not None:
            tensors["attention_mask"] = self.attention_mask.contiguous()
        save_file(tensors, str(path), metadata={"temperature": repr(float(self.temperature)), "meta": json.dumps(self.meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TeacherCache":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
        return cls(tensors["input_ids"], tensors["top_index"], tensors["top_logprob"], tensors["tail_logmass"],
                   temperature=float(metadata.get("temperature", "1.0")), attention_mask=tensors.get("attention_mask"),
                   meta=json.loads(metadata.get("meta", "{}")))


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def build_teacher_cache(
    model: nn.Module, input_ids: torch.Tensor, k: int = 64, temperature: float = 1.0, batch_size: int = 8,
    attention_mask: torch.Tensor | None = None, progress: bool = True,
) -> TeacherCache:
    """Run `model` (the uncompressed teacher) over `input_ids` [n, L] and keep its top-k next-token log-probs."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"teacher tokens must be [sequences, seq_len >= 2], got shape {tuple(input_ids.shape)}")
    if k < 1 or temperature <= 0:
        raise ValueError(f"need top_k >= 1 and temperature > 0, got top_k={k}, temperature={temperature}")
    device = _model_device(model)
    idx, logp, tail = [], [], []
    for batch in tqdm(as_batches(input_ids, batch_size, attention_mask), desc="teacher logits", unit="batch",
                      disable=not progress):
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        logits = model(input_ids=ids.to(device), attention_mask=None if mask is None else mask.to(device),
                       use_cache=False).logits[:, :-1].float().cpu()
        logprobs = F.log_softmax(logits / temperature, dim=-1)
        values, index = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
        idx.append(index.to(torch.int32))
        logp.append(values)
        tail.append(log1mexp(values.logsumexp(-1)))
    return TeacherCache(input_ids.clone(), torch.cat(idx), torch.cat(logp), torch.cat(tail), float(temperature),
                        None if attention_mask is None else attention_mask.clone(),
                        meta={"top_k": int(idx[0].shape[-1]), "sequences": int(input_ids.shape[0]),
                              "seq_len": int(input_ids.shape[1])})


def topk_kl(
    student_logits: torch.Tensor, top_index: torch.Tensor, top_logprob: torch.Tensor, tail_logmass: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-position KL(teacher~ || student~) [b, L-1] over the (k+1)-bin coarsening (see module doc).

    `student_logits` is [b, L, V] (the last position is dropped) or already [b, L-1, V].
    """
    if student_logits.shape[1] == top_index.shape[1] + 1:
        student_logits = student_logits[:, :-1]
    z = student_logits.float() / temperature
    log_z = z.logsumexp(-1)
    log_q_top = z.gather(-1, top_index.long()) - log_z.unsqueeze(-1)
    rest = z.scatter(-1, top_index.long(), float("-inf"))
    log_q_tail = rest.logsumexp(-1) - log_z
    p_top = top_logprob.exp()
    kl_top = (p_top * (top_logprob - log_q_top)).sum(-1)
    p_tail = tail_logmass.exp()
    kl_tail = torch.where(p_tail > 0, p_tail * (tail_logmass - log_q_tail), torch.zeros_like(p_tail))
    return kl_top + kl_tail


def kd_loss(
    student_logits: torch.Tensor, top_index: torch.Tensor, top_logprob: torch.Tensor, tail_logmass: torch.Tensor,
    mask: torch.Tensor | None = None, temperature: float = 1.0, eps: float = 1e-8,
) -> torch.Tensor:
    """Router KD loss (arXiv 2603.02217 Eq. 3): tau^2 * sum_t m_{t+1} KL_t / (sum_t m_{t+1} + eps), per batch."""
    kl = topk_kl(student_logits, top_index, top_logprob, tail_logmass, temperature)
    if mask is None:
        mask = torch.ones_like(kl)
    mask = mask.to(kl.device, kl.dtype)
    return temperature**2 * (kl * mask).sum() / (mask.sum() + eps)
