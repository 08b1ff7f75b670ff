"""``moeprune eval``: perplexity of one or more models on text sources, plus agreement/KL.

The first MODEL is the reference; every ``--compare`` model is evaluated on the same token windows
and compared with it (top-1 agreement, KL(reference ‖ candidate)). Results print as a table and
can be written as JSON, CSV and a PNG plot (perplexity per model and data source).
"""

from __future__ import annotations

import logging
import click
import torch

from moeprune.evaluation.agreement import compare_models
from moeprune.evaluation.perplexity import encode_texts, perplexity_from_ids
from moeprune.evaluation.report import print_table, write_csv, write_json
from moeprune.evaluation.text_sources import load_texts

log = logging.getLogger(__name__)


def _load(path: str):
    """Load a model and its tokenizer (the one place to swap for ``moeprune.load_pruned``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


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
def eval_command(model: str, compare: tuple[str, ...], data: tuple[str, ...], seq_len: int,
                 max_tokens: int | None, batch_size: int, json_path: str | None, csv_path: str | None,
                 plot_path: str | None) -> None:
    """Evaluate MODEL (and --compare models) on held-out text."""
    rows = evaluate_models([model, *compare], list(data), seq_len, max_tokens, batch_size)
    print_table(rows)
    if json_path:
        write_json(rows, json_path)
    if csv_path:
        write_csv(rows, csv_path)
    if plot_path:
        from moeprune.evaluation.plots import plot_perplexity_bars

        plot_perplexity_bars(rows, plot_path)
