"""Click options for intra-expert sparsity on `moeprune prune`, folded into recipe overrides.

The decorated command receives one `sparsify_overrides` dict of dotted recipe keys
(`sparsify.method`, ...), ready to merge into `load_recipe` overrides; any given option creates the
recipe's `sparsify:` section (method defaults to wanda).
"""

from __future__ import annotations

import click

from moeprune.click_groups import recipe_option_group

_OPTIONS = {
    "sparsify_method": "sparsify.method",
    "sparsity": "sparsify.sparsity",
    "total_sparsity": "sparsify.total_sparsity",
    "nm": "sparsify.nm",
    "owl": "sparsify.owl",
    "attention_sparsity": "sparsify.attention",
}


# Add --sparsify/--sparsity/--total-sparsity/--nm/--owl/--sparsify-attention to a command.
sparsify_options = recipe_option_group("sparsify_overrides", _OPTIONS, [
    click.option("--sparsify", "sparsify_method", type=click.Choice(["magnitude", "wanda", "moe-pruner", "sparsegpt"]),
                 help="Also prune weights inside the surviving experts with this method."),
    click.option("--sparsity", type=float, help="Share of weights zeroed in each surviving expert linear."),
    click.option("--total-sparsity", type=float,
                 help="Total share of routed-expert parameters removed (expert pruning + intra-expert)."),
    click.option("--nm", help="N:M semi-structured pattern, e.g. 2:4."),
    click.option("--owl/--no-owl", default=None, help="OWL non-uniform layer sparsity."),
    click.option("--sparsify-attention/--no-sparsify-attention", "attention_sparsity", default=None,
                 help="Also prune attention projections."),
])
