"""Click options of `moeprune prune` for channel slimming and PreMoE task patterns, as recipe overrides.

`slim_options` adds its dotted recipe keys (`slim.ratio`,
`slim.method`, `slim.mode`, `patterns`, `query`) to the command's `sparsify_overrides` dict (the
recipe-override dict the option groups feed into `load_recipe`), so the command's signature does
not change. Any given --slim-* option creates the recipe's `slim:` section; unset options add nothing.
"""

from __future__ import annotations

import click

from moeprune.click_groups import recipe_option_group

_OPTIONS = {
    "slim_channels": "slim.ratio",
    "slim_method": "slim.method",
    "slim_mode": "slim.mode",
    "patterns_path": "patterns",
    "query": "query",
}


# Add --slim-channels/--slim-method/--slim-mode/--patterns/--query to a command.
slim_options = recipe_option_group("sparsify_overrides", _OPTIONS, [
    click.option("--slim-channels", type=float,
                 help="Also remove this share of every routed expert's intermediate channels (physically)."),
    click.option("--slim-method", type=click.Choice(["camera", "coverage"]),
                 help="Channel scores: CAMERA-P energy (default) or MoE-Slimming attribution coverage."),
    click.option("--slim-mode", type=click.Choice(["uniform", "expert"]),
                 help="uniform: one width per layer (stock-loadable when all layers agree); expert: per-expert widths."),
    click.option("--patterns", "patterns_path", type=click.Path(exists=True, dir_okay=False),
                 help="PreMoE task patterns (`moeprune patterns`); with --query, prune to the nearest task."),
    click.option("--query", help="Text, or @FILE, whose nearest task pattern decides the kept experts."),
])
