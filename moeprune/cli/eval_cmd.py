"""``moeprune eval``: perplexity of one or more models on text sources, plus agreement/KL.

The first MODEL is the reference; every ``--compare`` model is evaluated on the same token windows
and compared with it (top-1 agreement, KL(reference ‖ candidate)). Results print as a table and
can be written as JSON, CSV and a PNG plot (perplexity per model and data source).
"""

from __future__ import annotations

import logging
import click
import torch

from moeprune.cli.errors import user_errors
from moeprune.cli.device_options import device_option
from moeprune.cli.load_options import load_options
from moeprune.evaluation.agreement import compare_models
from moeprune.evaluation.perplexity import encode_texts, perplexity_from_ids
from moeprune.evaluation.report import print_table, write_csv, write_json
from moeprune.evaluation.text_sources import load_texts

log = logging.getLogger(__name__)
_LOAD = {"dtype": "auto", "device": "auto"}  # --dtype (load_options) and --device of the running command


def _load(path: str):
    """Load a model and its tokenizer: builtin names, stock and moeprune (non-uniform, novice) outputs."""
    from moeprune.io.loading import load_model

    from moeprune.devices import move_model, resolve_device

    model, tokenizer, _ = load_model(path, dtype=_LOAD["dtype"], check_moe=False, device=_LOAD["device"])
    return move_model(model, resolve_device(_LOAD["device"])).eval(), tokenizer


def place_at_original_experts(values, kept: list, num_experts: int):
    """[layers, E'] values of a pruned model -> [layers, E] at the original expert indices (NaN where
    dropped). `kept[row]` is the plan's kept list for that row, or None for an unpruned row."""
    import numpy as np

    out = np.full((values.shape[0], num_experts), np.nan)
    for row, indices in enumerate(kept):
        indices = indices if indices is not None else list(range(values.shape[1]))
        out[row, indices] = values[row, : len(indices)]
    return out


def routing_heatmap(reference_path: str, candidate_path: str, data: list[str], seq_len: int, max_tokens: int | None,
                    path: str) -> None:
    """Per-layer routing frequency of the reference and the candidate, the candidate's experts placed
    at their original indices (from its moeprune_plan.json; dropped experts blank)."""
    import json
    from pathlib import Path

    from moeprune.evaluation.plots import plot_routing_heatmaps
    from moeprune.evaluation.routing_stats import routing_frequencies

    reference, tokenizer = _load(reference_path)
    ids = torch.cat([encode_texts(tokenizer, load_texts(src), max_tokens) for src in data])
    before = routing_frequencies(reference, ids, seq_len).numpy()
    candidate = _load(candidate_path)[0]
    raw = routing_frequencies(candidate, ids, seq_len).numpy()
    plan_file = Path(candidate_path) / "moeprune_plan.json"
    layers = json.loads(plan_file.read_text())["layers"] if plan_file.is_file() else {}
    kept = [layers.get(str(row), {}).get("kept") for row in range(before.shape[0])]
    after = place_at_original_experts(raw, kept, before.shape[1])
    plot_routing_heatmaps(before, after, path, title=f"routing: {Path(reference_path).name} -> {Path(candidate_path).name}")


def evaluate_models(
    model_paths: list[str], data: list[str], seq_len: int, max_tokens: int | None, batch_size: int
) -> list[dict]:
    """One result row per (model, data source); rows of compared models carry agreement and KL."""
    reference, tokenizer = _load(model_paths[0])
    token_ids = {src: encode_texts(tokenizer, load_texts(src), max_tokens) for src in data}
    rows: list[dict] = []
    for i, path in enumerate(model_paths):
        model = reference if i == 0 else _load(path)[0]
        for src, ids in token_ids.items():
            row = {"model": path, "data": src, "tokens": int(ids.numel()),
                   "perplexity": perplexity_from_ids(model, ids, seq_len, batch_size)}
            if i > 0:
                cmp = compare_models(reference, model, ids, seq_len, batch_size)
                row.update(top1_agreement=cmp["top1_agreement"], kl=cmp["kl"])
            rows.append(row)
        if i > 0:
            del model
    return rows


@click.command("eval")
@click.argument("model")
@click.option("--compare", "compare", multiple=True, help="Model(s) to compare with MODEL.")
@click.option("--data", "data", multiple=True, default=("builtin:code", "builtin:prose"), show_default=True,
              help="Text source: builtin:code|prose|mixed, a .txt/.jsonl file or folder, or hf:NAME[:CONFIG].")
@click.option("--seq-len", type=int, default=256, show_default=True)
@click.option("--max-tokens", type=int, default=None, help="Cap on tokens per data source.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None)
@click.option("--routing-plot", "routing_path", type=click.Path(dir_okay=False), default=None,
              help="PNG heatmaps of per-layer routing frequency, MODEL vs the first --compare model.")
@load_options()
@device_option()
@user_errors
def eval_command(model: str, compare: tuple[str, ...], data: tuple[str, ...], seq_len: int,
                 max_tokens: int | None, batch_size: int, json_path: str | None, csv_path: str | None,
                 plot_path: str | None, routing_path: str | None, load_overrides: dict, device: str | None) -> None:
    """Evaluate MODEL (and --compare models) on held-out text."""
    from moeprune.devices import resolve_device

    _LOAD["dtype"] = load_overrides["dtype"] or "auto"
    _LOAD["device"] = str(resolve_device(device or "auto"))  # a missing GPU fails before loading
    rows = evaluate_models([model, *compare], list(data), seq_len, max_tokens, batch_size)
    print_table(rows)
    if json_path:
        write_json(rows, json_path)
    if csv_path:
        write_csv(rows, csv_path)
    if plot_path:
        from moeprune.evaluation.plots import plot_perplexity_bars

        plot_perplexity_bars(rows, plot_path)
    if routing_path:
        if not compare:
            raise click.UsageError("--routing-plot needs a --compare model")
        routing_heatmap(model, compare[0], list(data), seq_len, max_tokens, routing_path)
