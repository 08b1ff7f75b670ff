"""Turn expected user errors into one-line CLI messages (exit code 2) instead of tracebacks."""

from __future__ import annotations

import functools
from typing import Any, Callable

import click
from pydantic import ValidationError

from moeprune.adapters import NotAnMoEModelError
from moeprune.io.checkpoint import OutputPathError
from moeprune.io.safetensors_io import CorruptCheckpointError
from moeprune.plan import PlanError

USER_ERRORS = (NotAnMoEModelError, PlanError, OutputPathError, CorruptCheckpointError, FileNotFoundError, ValidationError, ValueError)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            raise click.UsageError(str(err)) from err

    return wrapper
