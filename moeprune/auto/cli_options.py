"""Click options for `--strategy auto` on `moeprune prune`, folded into recipe overrides.

The decorated command receives one `auto_overrides` dict of dotted recipe keys (`auto.candidates`,
`auto.budgets`); given options create the recipe's `auto:` section.
"""

from __future__ import annotations

import functools

import click

from moeprune.click_groups import stack_options


def auto_options(fn):
    """Add --auto-candidates / --auto-val-source / --auto-budget to a command."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        candidates, budget = kwargs.pop("auto_candidates"), kwargs.pop("auto_budget")
        val_source = kwargs.pop("auto_val_source")
        overrides = {}
        if val_source:
            overrides["auto.val_source"] = val_source
        if candidates:
            overrides["auto.candidates"] = [c.strip() for c in candidates.split(",") if c.strip()]
        if budget:
            overrides["auto.budgets"] = ["layer", "global"]
        kwargs["auto_overrides"] = overrides
        return fn(*args, **kwargs)

    options = [
        click.option("--auto-candidates", help="With --strategy auto: comma-separated strategies to compare "
                     "(default: frequency,soft-frequency,ean,reap,man,msan,aimer,mone,dern)."),
        click.option("--auto-val-source", help="With --strategy auto: score candidates on sequences of this text "
                     "source (e.g. builtin:third-party-prose) instead of a held-out part of the calibration data."),
        click.option("--auto-budget", is_flag=True, default=False,
                     help="With --strategy auto: also try a global budget for every candidate that has one."),
    ]
    return stack_options(wrapper, options)
