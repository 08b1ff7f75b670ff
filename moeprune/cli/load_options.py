"""Click options shared by every command that loads a model: --dtype, --trust-remote-code.

The decorated command receives one `load_overrides` dict of recipe keys (`dtype`,
`trust_remote_code`, and for `prune` the safety options `allow_nonfinite` and `uniform`), ready
to merge into `load_recipe` overrides or to read directly. `--trust-remote-code` also sets the
process-wide opt-in (`moeprune.io.loading.set_trust_remote_code`) so every transformers loader of
the run sees it.
"""

from __future__ import annotations

import functools

import click

from moeprune.click_groups import stack_options
from moeprune.io.loading import DTYPE_CHOICES, set_trust_remote_code


def load_options(allow_nonfinite: bool = False):
    """Decorator factory: add --dtype / --trust-remote-code (and --allow-nonfinite) to a command."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            remote = kwargs.pop("trust_remote_code")
            overrides = {"dtype": kwargs.pop("dtype"), "trust_remote_code": True if remote else None}
            if allow_nonfinite:
                overrides["allow_nonfinite"] = True if kwargs.pop("allow_nonfinite") else None
                overrides["uniform"] = True if kwargs.pop("uniform") else None
            set_trust_remote_code(bool(remote))
            kwargs["load_overrides"] = overrides
            return fn(*args, **kwargs)

        options = [
            click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=None,
                         help="Dtype to load the model in (default auto: the checkpoint's own; outputs keep it)."),
            click.option("--trust-remote-code", is_flag=True,
                         help="Allow running Python code shipped with the checkpoint (auto_map). Off: never run or prompt."),
        ]
        if allow_nonfinite:
            options.append(click.option("--allow-nonfinite", is_flag=True,
                                        help="Drop (and report) experts whose weights hold NaN/Inf instead of failing."))
            options.append(click.option("--uniform", is_flag=True,
                                        help="Re-plan a non-uniform plan (--budget global) with equal per-layer counts "
                                             "at the same budget, loadable by llama.cpp/vLLM."))
        return stack_options(wrapper, options)

    return decorate
