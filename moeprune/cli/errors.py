"""Turn expected user errors into one-line CLI messages (exit code 2) instead of tracebacks.

Every failure a user can cause (bad paths, foreign or overlapping outputs, corrupt checkpoints,
invalid plans, recipes or configs, NaN weights) ends as `Error: <one line naming the problem and
the fix>` on stderr with exit code 2; nothing is written and the input is untouched.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import click
from pydantic import ValidationError

from moeprune.adapters import NotAnMoEModelError
from moeprune.io.checkpoint import OutputPathError
from moeprune.io.safetensors_io import CorruptCheckpointError
from moeprune.plan import PlanError

USER_ERRORS = (NotAnMoEModelError, PlanError, OutputPathError, CorruptCheckpointError, FileNotFoundError, ValidationError,
               ValueError, OSError, NotImplementedError)


class UserError(click.ClickException):
    """A one-line error (no usage text) with exit code 2."""

    exit_code = 2


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, ValidationError):  # pydantic: "N validation errors for X / field / msg" -> one line
        parts = [f"{'.'.join(str(p) for p in e['loc']) or 'recipe'}: {e['msg']}" for e in err.errors()]
        text = "invalid recipe: " + "; ".join(parts)
    return text


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except USER_ERRORS as err:
            raise UserError(one_line(err)) from err

    return wrapper
