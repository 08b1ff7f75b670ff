"""The entry layer: `run` assembles calibrate -> plan -> apply -> save, in memory or offloaded."""

from moeprune.pipeline.entry import run
from moeprune.pipeline.result import PruneResult

__all__ = ["run", "PruneResult"]
