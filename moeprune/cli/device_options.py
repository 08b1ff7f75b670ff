"""`--device` for every command that runs a model (one option, one validation: `moeprune.devices`).

The decorated command receives `device` as a normalised string (`cpu`, `cuda`, `cuda:N`, `auto`,
or None when not given, so a recipe's `device:` can apply); resolve it with
`moeprune.devices.resolve_device`.
"""

from __future__ import annotations

import click

from moeprune.devices import DEVICE_HELP, check_device_spec


def _validate(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return check_device_spec(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


def device_option(default: str | None = None):
    """Decorator adding `--device` (passed to the command as `device`)."""
    return click.option("--device", default=default, callback=_validate, metavar="cpu|cuda|cuda:N|auto",
                        help=DEVICE_HELP + ("" if default is None else f" [default: {default}]"))
