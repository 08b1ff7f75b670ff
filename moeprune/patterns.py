"""PreMoE task patterns: per-task expert rankings with a retrieval key, and query-time retrieval.

`build_patterns` calibrates once per task (one calibration source each) and stores, per MoE layer,
the task's PEU vector, its expert ranking (most useful first) and threshold r_l; the retrieval key
is the PEU vector of the first MoE layer, as in the reference (TAER: a FAISS L2 index over
first-layer score vectors). `query_key` runs a prompt only up to the first MoE router (the forward
is stopped there) and computes the same vector over the prompt's tokens, with the prompt's own
threshold; `nearest_task` picks the stored pattern closest in L2 (scikit-learn NearestNeighbors);
`pattern_plan` keeps the top M experts per layer of that task.

File format (JSON): {"format": "moeprune-patterns", "version": 1, "model", "top_k", "routing",
"peu_top_k", "key_layer", "experts_per_layer", "tasks": {name: {"source", "samples", "seq_len",
"seed", "stats_hash", "key": [E], "scores": {layer: [E]}, "ranking": {layer: [E]},
"thresholds": {layer: r}}}}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeprune.adapters import find_moe_layers
from moeprune.calibration.data import calibration_ids
from moeprune.calibration.observer import calibrate
from moeprune.calibration.peu import peu_vector
from moeprune.plan import Plan, PlanError
from moeprune.strategies.premoe import peu_score, peu_threshold, plan_from_scores

FORMAT = "moeprune-patterns"
MAX_QUERY_TOKENS = 4096


def build_patterns(
    model: nn.Module, tokenizer: Any, tasks: dict[str, str], samples: int = 64, seq_len: int = 256, seed: int = 0,
    batch_size: int = 8, progress: bool = True, model_name: str | None = None,
) -> dict[str, Any]:
    """One pattern per task `name -> calibration source`."""
    if not tasks:
        raise ValueError("give at least one task, e.g. --task code=builtin:code")
    layers = find_moe_layers(model)
    out: dict[str, Any] = {"format": FORMAT, "version": 1, "model": model_name, "tasks": {}}
    for name, source in tasks.items():
        ids = calibration_ids(source, tokenizer, samples, seq_len, seed)
        stats = calibrate(model, ids, batch_size=batch_size, progress=progress, meta={"source": source, "seed": seed})
        scores = {i: peu_score(s) for i, s in sorted(stats.layers.items())}
        first = min(scores)
        out.update({"top_k": stats.meta["top_k"], "routing": stats.meta["routing"],
                    "peu_top_k": stats.meta.get("peu_top_k"), "key_layer": first,
                    "experts_per_layer": {str(layer.layer): layer.num_experts for layer in layers}})
        out["tasks"][name] = {
            "source": source, "samples": samples, "seq_len": seq_len, "seed": seed, "stats_hash": stats.digest(),
            "key": [float(x) for x in scores[first]],
            "scores": {str(i): [float(x) for x in s] for i, s in scores.items()},
            "ranking": {str(i): sorted(range(s.numel()), key=lambda j, s=s: (-float(s[j]), j)) for i, s in scores.items()},
            "thresholds": {str(i): peu_threshold(stats.layers[i]) for i in scores},
        }
    return out


def save_patterns(patterns: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(patterns, indent=1))
    tmp.replace(path)
    return path


def load_patterns(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"patterns file not found: {path}")
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT or not data.get("tasks"):
        raise PlanError(f"{path} is not a moeprune patterns file with at least one task (run `moeprune patterns`)")
    return data


class _Stop(Exception):
    pass


def first_router_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Router logits [tokens, E] of the first MoE layer; the forward stops right after that router."""
    layer = find_moe_layers(model)[0]
    index = layer.routing.logits_index
    captured: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple, output: object) -> None:
        logits = output[index] if isinstance(output, (tuple, list)) else output
        captured["logits"] = logits.detach().reshape(-1, logits.shape[-1]).float().cpu()
        raise _Stop

    handle = layer.router.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=input_ids.to(next(model.parameters()).device), use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "logits" not in captured:
        raise RuntimeError("the first MoE router never ran on the query")
    return captured["logits"]


def read_query(query: str) -> str:
    """`@FILE` reads a file; anything else is the query text itself."""
    if query.startswith("@"):
        path = Path(query[1:])
        if not path.is_file():
            raise FileNotFoundError(f"query file not found: {path}")
        return path.read_text()
    return query


def query_key(model: nn.Module, tokenizer: Any, text: str, k_a: int) -> torch.Tensor:
    """The query's retrieval key: first-MoE-layer PEU over the prompt's tokens."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :MAX_QUERY_TOKENS]
    if ids.numel() == 0:
        raise ValueError("the query is empty")
    return peu_vector(first_router_logits(model, ids), k_a)[0]


def nearest_task(patterns: dict[str, Any], key: torch.Tensor) -> tuple[str, float]:
    """(task name, L2 distance) of the stored key nearest to `key`."""
    from sklearn.neighbors import NearestNeighbors

    names = list(patterns["tasks"])
    keys = [patterns["tasks"][n]["key"] for n in names]
    if any(len(k) != key.numel() for k in keys):
        raise PlanError(f"pattern keys have {len(keys[0])} entries but the model's first MoE layer has {key.numel()} experts")
    index = NearestNeighbors(n_neighbors=1, metric="euclidean").fit(keys)
    dist, pos = index.kneighbors([key.double().tolist()])
    return names[int(pos[0][0])], float(dist[0][0])


def pattern_plan(patterns: dict[str, Any], task: str, ratio: float) -> Plan:
    """The plan keeping, per layer, the top M = E - floor(E * ratio) experts of `task`'s pattern."""
    entry = patterns["tasks"][task]
    return plan_from_scores(
        {int(i): v for i, v in entry["scores"].items()}, ratio, int(patterns["top_k"]), patterns.get("routing", {}),
        params={"task": task, "task_source": entry["source"], "pattern_stats_hash": entry["stats_hash"]},
    )


def retrieve_plan(model: nn.Module, tokenizer: Any, patterns: dict[str, Any], query: str, ratio: float) -> tuple[Plan, str, float]:
    """(plan, chosen task, distance) for a query against stored patterns."""
    layers = {str(layer.layer): layer.num_experts for layer in find_moe_layers(model)}
    stored = patterns.get("experts_per_layer", {})
    if stored and stored != layers:
        raise PlanError(f"patterns were built for experts per layer {stored}, this model has {layers}")
    k_a = int(patterns.get("peu_top_k") or patterns.get("top_k") or 1)
    task, dist = nearest_task(patterns, query_key(model, tokenizer, read_query(query), k_a))
    result = pattern_plan(patterns, task, ratio)
    result.params["query_distance"] = dist
    return result, task, dist
