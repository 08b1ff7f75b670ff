"""`moeprune patterns MODEL --task NAME=SOURCE ... -o patterns.json`: PreMoE task patterns.

Calibrates once per task and stores per layer the task's PEU scores and expert ranking, plus the
retrieval key (first MoE layer's PEU vector); `moeprune prune MODEL --patterns patterns.json
--query "..." --ratio R -o OUT` then prunes to the task nearest to the query (`moeprune.patterns`).
"""

from __future__ import annotations

import click

from moeprune.cli.errors import user_errors
from moeprune.io.loading import BUNDLED


def _parse_tasks(tasks: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in tasks:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            raise click.BadParameter(f"{item!r}: give NAME=SOURCE, e.g. code=builtin:code", param_hint="--task")
        if name in out:
            raise click.BadParameter(f"task {name!r} given twice", param_hint="--task")
        out[name] = source
    return out


@click.command()
@click.argument("model", default=BUNDLED)
@click.option("--task", "tasks", multiple=True, required=True, help="NAME=SOURCE (calibration source of that task); repeat.")
@click.option("--samples", type=int, default=64, show_default=True, help="Calibration sequences per task.")
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per sequence.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling calibration documents.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Sequences per forward pass.")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="Patterns file (.json).")
@user_errors
def patterns_command(model, tasks, samples, seq_len, seed, batch_size, output) -> None:
    """Store per-task expert rankings (PreMoE PEU) with a retrieval key."""
    from moeprune.io.loading import load_model
    from moeprune.patterns import build_patterns, save_patterns

    named = _parse_tasks(tasks)
    loaded, tokenizer, _ = load_model(model)
    if tokenizer is None:
        raise click.UsageError(f"{model} has no tokenizer; patterns need one to read the task sources")
    patterns = build_patterns(loaded, tokenizer, named, samples=samples, seq_len=seq_len, seed=seed,
                              batch_size=batch_size, model_name=model)
    save_patterns(patterns, output)
    click.echo(f"wrote {output}: tasks {', '.join(named)} (key: MoE layer {patterns['key_layer']}, K_a {patterns['peu_top_k']})")
