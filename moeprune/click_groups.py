"""Groups of click options folded into dotted recipe overrides: the one mechanism every option
module (`--sparsify*`, `--naee-*`/`--dynamic-skip`, `--slim-*`/`--patterns`, `--router-kd*`,
`--auto-*`) and the pipeline commands' shared option lists use.

Why a module of its own at the package root: the option modules live beside the features they
configure (sparsify/, slimming/, recover/, auto/), below the `moeprune.cli` package, so the helper
they share must not import anything of moeprune.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import click


def stack_options(fn: Callable[..., Any], options: list[Callable]) -> Callable[..., Any]:
    """Apply click `options` to `fn` so they appear in `--help` in list order."""
    for option in reversed(options):
        fn = option(fn)
    return fn


def recipe_option_group(
    target: str, keys: dict[str, str], options: list[Callable]
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator adding `options` to a command; the command receives, instead of their values,
    one dict `target` mapping dotted recipe keys (`keys[param]`) to the given values (None when an
    option was not given). Groups with the same `target` merge, in any decorator order."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            overrides = {key: kwargs.pop(name) for name, key in keys.items()}
            kwargs[target] = {**kwargs.get(target, {}), **overrides}
            return fn(*args, **kwargs)

        return stack_options(wrapper, options)

    return decorate
