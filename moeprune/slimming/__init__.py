"""Channel slimming inside experts (CAMERA-P energy, MoE-Slimming coverage), removed physically.

`slim_channels` is imported lazily so `moeprune.config` can import `moeprune.slimming.config`
without the calibration stack.
"""

from typing import Any

__all__ = ["SlimReport", "slim_channels"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from moeprune.slimming import run

        return getattr(run, name)
    raise AttributeError(f"module 'moeprune.slimming' has no attribute {name!r}")
