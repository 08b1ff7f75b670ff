"""Native log-likelihood scorer for multiple-choice items, the same numbers as lm-eval's.

lm-eval-harness is an optional extra, so the benchmark and tests score the bundled tasks
(:mod:`mc_tasks`) here. The rules follow lm-eval's ``HFLM`` for causal models: trailing whitespace
of the context moves to the continuation, ``context + continuation`` is tokenised whole and split
at the context's token count, an empty context is replaced by the eos token; ``acc`` picks the
choice with the highest summed log-likelihood, ``acc_norm`` the highest log-likelihood per
character of the choice, ``acc_mutual_info`` the highest log p(choice | context) - log p(choice)
(the choice scored after an empty context), which cancels a small model's preference for short or
common choices; standard errors are the sample standard deviation over items / sqrt(n).

For speed the context of an item is run once and its key/value cache is shared by all choices;
items of similar context length are batched (contexts left-padded and masked, choices
right-padded, which cannot affect earlier positions under causal attention). Tests check the
result against scoring every ``context + choice`` sequence alone.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) exactly as lm-eval's causal ``_encode_pair`` makes them."""
    if not context:
        return [tokenizer.eos_token_id], tokenizer.encode(continuation, add_special_tokens=False)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    n_ctx = len(tokenizer.encode(context, add_special_tokens=False))
    return whole[:n_ctx], whole[n_ctx:]


def _encode_items(tokenizer: Any, items: list[dict[str, Any]]) -> list[tuple[list[int], list[list[int]]]]:
    out = []
    for item in items:
        pairs = [encode_pair(tokenizer, item["context"], c) for c in item["choices"]]
        # lm-eval splits each pair on its own; with a whitespace-free context end they agree.
        ctx = pairs[0][0]
        if any(p[0] != ctx for p in pairs):
            raise ValueError(f"context tokenisation depends on the choice: {item['context'][-40:]!r}")
        out.append((ctx, [p[1] for p in pairs]))
    return out


def _batches(encoded: list[tuple[list[int], list[list[int]]]], max_batch_tokens: int) -> list[list[int]]:
    """Item indices sorted by context length, cut into batches of bounded padded size."""
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i][0]), max(len(c) for c in encoded[i][1])))
    batches: list[list[int]] = []
    current: list[int] = []
    n_ctx = width = 0
    for i in order:
        ctx, conts = encoded[i]
        n_ctx2, width2 = max(n_ctx, len(ctx)), max(width, max(len(c) for c in conts))
        if current and (len(current) + 1) * (n_ctx2 + len(conts) * width2) > max_batch_tokens:
            batches.append(current)
            current, n_ctx2, width2 = [], len(ctx), max(len(c) for c in conts)
        current.append(i)
        n_ctx, width = n_ctx2, width2
    if current:
        batches.append(current)
    return batches


@torch.no_grad()
def choice_loglikelihoods(model: nn.Module, tokenizer: Any, items: list[dict[str, Any]],
                          max_batch_tokens: int = 8192, progress: bool = False) -> list[list[float]]:
    """Summed log-likelihood of every choice of every item (``[n_items][n_choices]``).

    Contexts are left-padded (masked, with position ids counted from the first real token) and run
    once; their key/value cache is repeated for the choices, which are right-padded.
    """
    encoded = _encode_items(tokenizer, items)
    device = next(model.parameters()).device
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    result: list[list[float]] = [[] for _ in items]
    was_training = model.training
    model.eval()
    try:
        for idxs in tqdm(_batches(encoded, max_batch_tokens), desc="choices", disable=not progress, leave=False):
            n_choice = len(encoded[idxs[0]][1])
            if any(len(encoded[i][1]) != n_choice for i in idxs):
                raise ValueError("items batched together must have the same number of choices")
            lengths = torch.tensor([len(encoded[i][0]) for i in idxs], device=device)
            n_ctx = int(lengths.max())
            ctx = torch.full((len(idxs), n_ctx), pad, dtype=torch.long, device=device)
            ctx_mask = torch.zeros(len(idxs), n_ctx, dtype=torch.long, device=device)
            for r, i in enumerate(idxs):
                ctx[r, n_ctx - len(encoded[i][0]) :] = torch.tensor(encoded[i][0])
                ctx_mask[r, n_ctx - len(encoded[i][0]) :] = 1
            positions = (ctx_mask.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=ctx, attention_mask=ctx_mask, position_ids=positions, use_cache=True,
                        logits_to_keep=1)
            first = torch.log_softmax(out.logits[:, -1].float(), dim=-1).repeat_interleave(n_choice, dim=0)
            conts = [c for i in idxs for c in encoded[i][1]]
            width = max(len(c) for c in conts)
            if width == 0:
                raise ValueError("a choice encodes to no tokens")
            cont = torch.full((len(conts), width), pad, dtype=torch.long, device=device)
            for r, c in enumerate(conts):
                cont[r, : len(c)] = torch.tensor(c)
            cache = getattr(out, "cache", None) or out.past_key_values
            cache.batch_repeat_interleave(n_choice)
            cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
            mask = torch.cat([ctx_mask.repeat_interleave(n_choice, dim=0),
                              torch.ones(len(conts), width, dtype=torch.long, device=device)], dim=1)
            cont_pos = lengths.repeat_interleave(n_choice)[:, None] + torch.arange(width, device=device)
            logits = model(input_ids=cont, attention_mask=mask, position_ids=cont_pos, use_cache=False,
                           **{cache_kw: cache}).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            for r, c in enumerate(conts):
                t = torch.tensor(c, device=device)
                ll = first[r, t[0]] + logp[r, : len(c) - 1].gather(-1, t[1:, None]).sum()
                result[idxs[r // n_choice]].append(float(ll))
    finally:
        model.train(was_training)
    return result


@torch.no_grad()
def choice_loglikelihoods_reference(model: nn.Module, tokenizer: Any, items: list[dict[str, Any]]) -> list[list[float]]:
    """The same, one full ``context + choice`` sequence at a time (slow; for tests)."""
    out = []
    for ctx, conts in _encode_items(tokenizer, items):
        row = []
        for c in conts:
            ids = torch.tensor([ctx + c])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            pos = torch.arange(len(ctx) - 1, len(ctx) + len(c) - 1)
            row.append(float(logp[pos, torch.tensor(c)].sum()))
        out.append(row)
    return out


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def _hits(items: list[dict[str, Any]], scores: list[list[float]]) -> list[int]:
    """1 where the highest-scoring choice is the label, else 0 (the first of equal scores wins)."""
    return [int(max(range(len(row)), key=lambda j: row[j]) == item["label"]) for item, row in zip(items, scores)]


def accuracy(items: list[dict[str, Any]], lls: list[list[float]],
             unconditional: list[list[float]] | None = None) -> dict[str, Any]:
    """acc, acc_norm (per character of the choice) and, given the choices' log-likelihoods after
    an empty context, acc_mutual_info (log p(choice | context) - log p(choice)), with standard
    errors, n, chance level and each item's 0/1 outcome per metric (``<metric>_hits``, for paired
    comparisons of two models on the same items)."""
    if not items:
        raise ValueError("no items to score")
    scores = {"acc": lls, "acc_norm": [[v / max(1, len(c)) for v, c in zip(ll, item["choices"])]
                                       for item, ll in zip(items, lls)]}
    if unconditional is not None:
        scores["acc_mutual_info"] = [[a - b for a, b in zip(ll, u)] for ll, u in zip(lls, unconditional)]
    out: dict[str, Any] = {}
    for metric, values in scores.items():
        hits = _hits(items, values)
        out[metric], out[f"{metric}_stderr"] = _mean_stderr([float(h) for h in hits])
        out[f"{metric}_hits"] = hits
    chance = [1.0 / len(item["choices"]) for item in items]
    return {**out, "n": len(items), "chance": sum(chance) / len(chance)}


def score_items(model: nn.Module, tokenizer: Any, items: list[dict[str, Any]], mutual_info: bool = True,
                progress: bool = False) -> dict[str, Any]:
    """Score multiple-choice items natively (see module docstring); ``mutual_info`` adds the
    unconditional pass that ``acc_mutual_info`` needs (lm-eval's metric of the same name)."""
    lls = choice_loglikelihoods(model, tokenizer, items, progress=progress)
    uncond = None
    if mutual_info:
        uncond = choice_loglikelihoods(model, tokenizer, [{**item, "context": ""} for item in items], progress=progress)
    return accuracy(items, lls, uncond)
