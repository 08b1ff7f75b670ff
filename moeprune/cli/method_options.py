"""Click options of `moeprune prune` for NAEE (`--strategy naee`) and dynamic skipping, as recipe overrides.

`naee_options` adds its dotted recipe keys
(`params.max_subsets`, `params.search`, `params.sample_tokens`, `dynamic_skip`) to the command's
`sparsify_overrides` dict, the recipe-override dict the option groups feed into `load_recipe`, so
the command's signature does not change. Unset options add nothing.
"""

from __future__ import annotations

import click

from moeprune.click_groups import recipe_option_group

_OPTIONS = {
    "naee_max_subsets": "params.max_subsets",
    "naee_search": "params.search",
    "naee_tokens": "params.sample_tokens",
    "dynamic_skip": "dynamic_skip",
}


# Add --naee-max-subsets/--naee-search/--naee-tokens/--dynamic-skip to a command.
naee_options = recipe_option_group("sparsify_overrides", _OPTIONS, [
    click.option("--naee-max-subsets", type=int,
                 help="NAEE: enumerate every subset when C(E, kept) is at most this (default 4096), else greedy."),
    click.option("--naee-search", type=click.Choice(["auto", "exact", "greedy"]), help="NAEE: force the search."),
    click.option("--naee-tokens", type=int, help="NAEE: calibration tokens sampled per layer (default 2048)."),
    click.option("--dynamic-skip/--no-dynamic-skip", default=None,
                 help="NAEE dynamic skipping: skip selected experts whose gate < beta x the top gate "
                      "(beta per layer from calibration; installed by moeprune.load_pruned)."),
])
