"""Unstructured and N:M sparsity inside surviving experts (Wanda, MoE-Pruner, SparseGPT, OWL).

`sparsify` and `SparsifyReport` are imported lazily so `moeprune.config` can import the light
`moeprune.sparsify.config` without pulling in the calibration stack.
"""

from typing import Any

__all__ = ["SparsifyReport", "sparsify"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from moeprune.sparsify import run

        return getattr(run, name)
    raise AttributeError(f"module 'moeprune.sparsify' has no attribute {name!r}")
